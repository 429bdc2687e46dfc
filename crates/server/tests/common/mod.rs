//! Shared by the server's test binaries: start a real server on a port-0 listener.

use quiver_engine::{Engine, EngineConfig};
use std::sync::Arc;

/// Opens an engine with `config` and serves it on 127.0.0.1:0 until the test ends; returns
/// the base URL (`http://127.0.0.1:PORT`) and the engine.
pub async fn spawn(config: EngineConfig) -> (String, Arc<Engine>) {
    let engine = Engine::open(config).expect("the engine opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let base = format!("http://{}", listener.local_addr().expect("a bound address"));
    tokio::spawn(quiver_server::serve(
        listener,
        engine.clone(),
        std::future::pending(),
    ));
    (base, engine)
}
