//! The delivery loop of one endpoint: read the next matching event from the bus (from the
//! endpoint's position), deliver it with retries, then move the position — only after a 2xx,
//! or after parking the event. One request in flight per endpoint, so receivers see `seq`
//! order. Parked events asked to be retried go before the next live event.
//!
//! It must never advance the position for an event it did not deliver or park, nor hold a
//! global permit while it sleeps between attempts.

use super::target::{self, ClientCache, Verdict};
use super::{lock, store, Delivery, Endpoint, Shared, Status, PARKED_LIMIT};
use crate::bus::{BusError, EventFrame, SubscriberKind, Subscription};
use quiver_engine::WriteCtx;
use quiver_log::Seq;
use quiver_model::time::{now_ms, rfc3339_ms};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How delivering one event ended.
enum Done {
    Delivered,
    Parked,
    /// 410: the endpoint is now disabled; the event stays undelivered.
    Disabled,
    /// Paused, deleted or shutting down mid-way: try again later from the same position.
    Interrupted,
}

pub(crate) async fn run(shared: Arc<Shared>, ep: Arc<Endpoint>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut changes = ep.changes.subscribe();
    let mut cache = ClientCache::default();
    let mut sub: Option<Subscription> = None;
    let mut sub_filter = None;
    let mut dirty = false;
    loop {
        if *shutdown.borrow() || ep.deleted.load(Ordering::Acquire) {
            break;
        }
        // Any change (pause, patch, retry request…) restarts the subscription from the
        // saved position with the current filter.
        if changes.has_changed().unwrap_or(false) {
            changes.borrow_and_update();
            sub = None;
        }
        if sub_filter.as_ref() != Some(&lock(&ep.reg).filter()) {
            sub = None;
        }
        if !ep.is_active() {
            sub = None;
            if dirty {
                dirty = !save(&shared, &ep).await;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let retry = lock(&ep.retry_queue).pop_front();
        if let Some(seq) = retry {
            retry_parked(&shared, &ep, &mut cache, &mut changes, &mut shutdown, seq).await;
            save(&shared, &ep).await;
            continue;
        }
        if sub.is_none() {
            let (filter, position) = {
                let reg = lock(&ep.reg);
                (reg.filter(), reg.position)
            };
            match shared
                .bus
                .subscribe(SubscriberKind::Webhook, Some(position + 1), filter.clone())
            {
                Ok(s) => {
                    sub = Some(s);
                    sub_filter = Some(filter);
                }
                Err(BusError::Expired { first_seq, .. }) => {
                    skip_expired(&ep, position, first_seq);
                    save(&shared, &ep).await;
                    continue;
                }
                Err(BusError::Stopped) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook worker cannot subscribe; retrying");
                    if sleep_or_stop(&mut shutdown, Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(s) = sub.as_mut() else { continue };
        let flush_after = if dirty {
            shared.config.save_interval
        } else {
            Duration::from_secs(3600)
        };
        let next = tokio::select! {
            r = s.next() => r,
            _ = changes.changed() => continue,
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(flush_after) => {
                dirty = !save(&shared, &ep).await;
                continue;
            }
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(BusError::Expired { first_seq, .. }) => {
                let position = lock(&ep.reg).position;
                skip_expired(&ep, position, first_seq);
                sub = None;
                dirty = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook worker cannot read the log; retrying");
                sub = None;
                if sleep_or_stop(&mut shutdown, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        // The events webhooks write about themselves are for stream subscribers only.
        if frame.event_type().starts_with("webhook.") {
            advance(&ep, frame.seq);
            dirty = true;
            continue;
        }
        match deliver(
            &shared,
            &ep,
            &mut cache,
            &mut changes,
            &mut shutdown,
            &frame,
        )
        .await
        {
            Done::Delivered => {
                s.delivered(&frame);
                advance(&ep, frame.seq);
                dirty = true;
            }
            Done::Parked => {
                park(&shared, &ep, &frame);
                advance(&ep, frame.seq);
                // A parked event is saved at once (with the history that explains it).
                dirty = !save(&shared, &ep).await;
            }
            Done::Disabled => {
                sub = None;
                dirty = !save(&shared, &ep).await;
            }
            Done::Interrupted => {
                sub = None;
                // The attempts so far are in the history.
                dirty = true;
            }
        }
        if dirty && lock(&ep.last_saved).elapsed() >= shared.config.save_interval {
            dirty = !save(&shared, &ep).await;
        }
    }
    save(&shared, &ep).await;
}

/// Saves; true when it worked (a failure is logged and retried at the next save).
async fn save(shared: &Arc<Shared>, ep: &Arc<Endpoint>) -> bool {
    match store::save(shared, ep).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "cannot save a webhook's position; will retry");
            false
        }
    }
}

fn advance(ep: &Endpoint, seq: Seq) {
    let mut reg = lock(&ep.reg);
    if seq > reg.position {
        reg.position = seq;
    }
}

fn skip_expired(ep: &Endpoint, position: Seq, first_seq: Seq) {
    tracing::warn!(
        from = position + 1,
        to = first_seq.saturating_sub(1),
        "a webhook fell behind the log's retention; those events are gone"
    );
    ep.record(Delivery {
        seq: first_seq.saturating_sub(1),
        event_type: String::new(),
        status: "expired".into(),
        response_code: None,
        latency_ms: 0,
        attempt: 0,
        error: Some(format!(
            "events {} to {} were removed by the log's retention before they were delivered",
            position + 1,
            first_seq.saturating_sub(1)
        )),
        at: rfc3339_ms(now_ms()),
    });
    advance(ep, first_seq.saturating_sub(1));
}

/// Sleeps; true if the server is shutting down.
async fn sleep_or_stop(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// Waits until `deadline`; true if interrupted (paused, deleted, shutting down).
async fn wait_until(
    ep: &Endpoint,
    changes: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    deadline: Instant,
) -> bool {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            r = changes.changed() => {
                if r.is_err() || !ep.is_active() {
                    return true;
                }
            }
            _ = shutdown.changed() => return true,
        }
    }
}

/// The delay before attempt `attempt + 1`: exponential from the base, capped, with jitter
/// (uniform in the upper half, so retries of many endpoints spread out).
fn backoff(shared: &Shared, attempt: u32) -> Duration {
    let base = shared.config.backoff_base.as_millis() as u64;
    let max = shared.config.backoff_max.as_millis() as u64;
    let exp = base
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(max);
    let half = exp / 2;
    let jitter = if half == 0 {
        0
    } else {
        rand::random::<u64>() % (half + 1)
    };
    Duration::from_millis(half + jitter)
}

/// Delivers one event with up to `max_attempts` attempts.
async fn deliver(
    shared: &Arc<Shared>,
    ep: &Arc<Endpoint>,
    cache: &mut ClientCache,
    changes: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    frame: &EventFrame,
) -> Done {
    let body = frame.cloudevent().as_bytes().to_vec();
    let webhook_id = frame.seq.to_string();
    let mut attempt: u32 = 0;
    loop {
        if *shutdown.borrow() || !ep.is_active() {
            return Done::Interrupted;
        }
        attempt += 1;
        let (url, secret, max_attempts) = {
            let reg = lock(&ep.reg);
            (reg.url.clone(), reg.secret.clone(), reg.max_attempts)
        };
        let result = {
            let Ok(_permit) = shared.permits.clone().acquire_owned().await else {
                return Done::Interrupted;
            };
            target::send(
                cache,
                &url,
                shared.config.allow_private,
                shared.config.request_timeout,
                &secret,
                &webhook_id,
                &body,
            )
            .await
        };
        let status = match &result.verdict {
            Verdict::Delivered => "delivered",
            Verdict::Gone => "gone",
            Verdict::Failed { .. } => "failed",
        };
        ep.record(Delivery {
            seq: frame.seq,
            event_type: frame.event_type().to_string(),
            status: status.into(),
            response_code: result.response_code,
            latency_ms: result.latency_ms,
            attempt,
            error: result.error.clone(),
            at: rfc3339_ms(now_ms()),
        });
        match result.verdict {
            Verdict::Delivered => return Done::Delivered,
            Verdict::Gone => {
                disable(shared, ep, "the receiver answered 410 Gone");
                return Done::Disabled;
            }
            Verdict::Failed { retry_after } => {
                if attempt >= max_attempts.max(1) {
                    ep.record(Delivery {
                        seq: frame.seq,
                        event_type: frame.event_type().to_string(),
                        status: "parked".into(),
                        response_code: result.response_code,
                        latency_ms: 0,
                        attempt,
                        error: result.error,
                        at: rfc3339_ms(now_ms()),
                    });
                    return Done::Parked;
                }
                let delay = match retry_after {
                    Some(d) => d.min(shared.config.retry_after_max),
                    None => backoff(shared, attempt),
                };
                if wait_until(ep, changes, shutdown, Instant::now() + delay).await {
                    return Done::Interrupted;
                }
            }
        }
    }
}

fn disable(shared: &Arc<Shared>, ep: &Arc<Endpoint>, reason: &str) {
    let (id, library_id) = {
        let mut reg = lock(&ep.reg);
        reg.status = Status::Disabled;
        reg.disabled_reason = Some(reason.to_string());
        reg.updated_at_ms = now_ms();
        (reg.id.clone(), reg.library_id.clone())
    };
    tracing::warn!(webhook = %id, reason, "webhook endpoint disabled");
    let ctx = WriteCtx {
        trace_id: None,
        source: Some("webhooks".to_string()),
    };
    if let Err(e) = shared.engine.append_system_event(
        &ctx,
        "webhook.disabled",
        library_id,
        json!({"webhook_id": id, "reason": reason}),
    ) {
        tracing::error!(error = %e, "cannot append webhook.disabled");
    }
}

fn park(shared: &Arc<Shared>, ep: &Arc<Endpoint>, frame: &EventFrame) {
    let (id, attempts, last) = {
        let mut reg = lock(&ep.reg);
        reg.parked.insert(frame.seq);
        while reg.parked.len() > PARKED_LIMIT {
            reg.parked.pop_first();
        }
        let last = lock(&ep.history).back().cloned();
        (reg.id.clone(), reg.max_attempts, last)
    };
    let ctx = WriteCtx {
        trace_id: frame.event.trace_id.clone(),
        source: Some("webhooks".to_string()),
    };
    let (code, error) = last.map_or((None, None), |d| (d.response_code, d.error));
    if let Err(e) = shared.engine.append_system_event(
        &ctx,
        "webhook.parked",
        frame.library_id().map(str::to_string),
        json!({
            "webhook_id": id,
            "seq": frame.seq,
            "event_type": frame.event_type(),
            "attempts": attempts,
            "last_response_code": code,
            "last_error": error,
        }),
    ) {
        tracing::error!(error = %e, "cannot append webhook.parked");
    }
}

/// Delivers a parked event again (the full attempt policy); it leaves the parked list once
/// delivered, or once the log no longer holds it.
async fn retry_parked(
    shared: &Arc<Shared>,
    ep: &Arc<Endpoint>,
    cache: &mut ClientCache,
    changes: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    seq: Seq,
) {
    let frame = match shared.bus.read_page(seq).await {
        Ok((frames, _)) => frames.into_iter().find(|f| f.seq == seq),
        Err(BusError::Expired { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, seq, "cannot read a parked event; will retry");
            lock(&ep.retry_queue).push_front(seq);
            let _ = sleep_or_stop(shutdown, Duration::from_secs(1)).await;
            return;
        }
    };
    let Some(frame) = frame else {
        lock(&ep.reg).parked.remove(&seq);
        ep.record(Delivery {
            seq,
            event_type: String::new(),
            status: "expired".into(),
            response_code: None,
            latency_ms: 0,
            attempt: 0,
            error: Some("the event is no longer in the log".to_string()),
            at: rfc3339_ms(now_ms()),
        });
        return;
    };
    match deliver(shared, ep, cache, changes, shutdown, &frame).await {
        Done::Delivered => {
            lock(&ep.reg).parked.remove(&seq);
        }
        Done::Parked => park(shared, ep, &frame),
        Done::Disabled => {}
        Done::Interrupted => lock(&ep.retry_queue).push_front(seq),
    }
}
