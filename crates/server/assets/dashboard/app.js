// Quiver's dashboard: the libraries, a live feed of the change stream, search and the event
// bus's statistics of one server, in one page with no build step and nothing fetched from
// anywhere but the server that serves it.
//
// What it owns: showing what the v1 API returns. It must never change data (it only reads
// and searches), never render a server's or a user's text as HTML (everything goes through
// textContent), and never grow without bound (every buffer below has a limit).
//
// Snapshot, then tail: the library table is read with GET /v1/libraries, which reports the
// seq it is consistent at (S); the event stream is then opened with from_seq = S + 1, so every
// later change arrives exactly once and none is missed. When the connection drops (a restart,
// a network blip, a slow-subscriber disconnect) the page reconnects after a backoff with
// from_seq = the last seq it saw + 1: the log replays what happened meanwhile. Only when the
// resume point has left the log's retention (410) or the server's log is not the one followed
// (its head is behind the page) does the page read a new snapshot.
'use strict';

/** Events kept for the feed; older ones are dropped (the log keeps them, not the page). */
const FEED_EVENTS_LIMIT = 2000;
/** Rows the feed shows (the newest matching ones). */
const FEED_ROWS_LIMIT = 200;
/** Characters of one unfinished SSE frame; past it the stream is dropped and resumed. */
const FRAME_CHARS_LIMIT = 8 << 20;
const RECONNECT_MS_MIN = 250;
const RECONNECT_MS_MAX = 8000;
const STATS_INTERVAL_MS = 2000;
const RENDER_INTERVAL_MS = 200;
/** Events of one library within this window cause one re-read of it. */
const REFRESH_DELAY_MS = 150;
/** Jobs shown (GET /v1/jobs lists the newest first). */
const JOBS_SHOWN = 20;
/** The window of the events/s figure, in whole seconds (one counter each). */
const RATE_WINDOW_SECONDS = 5;
/** Events before the snapshot shown when the page opens (read with GET /v1/events). */
const HISTORY_EVENTS = 50;
/** Characters of an event's data shown in its feed row. */
const DATA_CHARS_SHOWN = 160;

const state = {
  /** id → {library, seq}: the newest read of each library. */
  libraries: new Map(),
  /** The seq the page is consistent at: the snapshot's, then each streamed event's. */
  lastSeq: 0,
  /** The newest events, oldest first; trimmed to FEED_EVENTS_LIMIT in batches. */
  feed: [],
  paused: false,
  /** Says, until the page is reloaded, that the feed has a hole (events that left the log
   * before the page could read them), so no loss goes unseen. */
  notice: '',
  /** Events that arrived while the feed was paused. */
  pausedArrivals: 0,
  feedDirty: false,
  librariesDirty: false,
  /** library id → pending re-read timer. */
  refreshes: new Map(),
  /** Events that arrived in each of the last RATE_WINDOW_SECONDS seconds (a ring by second),
   * and the second the newest counter belongs to. */
  arrivals: new Array(RATE_WINDOW_SECONDS).fill(0),
  arrivalsSecond: 0,
  /** A pending re-read of the jobs list, if any. */
  jobsRefresh: null,
  /** The library whose index details are shown. */
  selected: null,
};

const byId = (id) => document.getElementById(id);

function text(tag, value, className) {
  const node = document.createElement(tag);
  node.textContent = value === undefined || value === null ? '' : String(value);
  if (className) node.className = className;
  return node;
}

function formatBytes(n) {
  if (typeof n !== 'number') return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

/** The API's JSON error, as one sentence. */
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error + ': ' + (body.detail || '');
  } catch (_) { /* not JSON */ }
  return 'HTTP ' + response.status;
}

/** GET or POST `path`; resolves to the JSON body, rejects with the API's error. */
async function api(path, body) {
  const init = body === undefined
    ? { cache: 'no-store' }
    : { method: 'POST', cache: 'no-store', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) {
    const error = new Error(await errorOf(response));
    error.status = response.status;
    throw error;
  }
  return response.json();
}

// ------------------------------------------------------------------ libraries

async function loadSnapshot() {
  const body = await api('/v1/libraries');
  state.libraries.clear();
  for (const library of body.libraries) state.libraries.set(library.id, { library, seq: body.seq });
  state.lastSeq = body.seq;
  state.librariesDirty = true;
  byId('last-seq').textContent = String(state.lastSeq);
  if (state.selected && !state.libraries.has(state.selected)) state.selected = null;
  loadIndexDetails();
}

/** Fills the feed with the events up to the snapshot's seq, so it does not open empty. It is
 * a courtesy: if they have left the log's retention, or the read fails, the feed starts with
 * the stream. */
async function loadHistory() {
  const upTo = state.lastSeq;
  if (upTo < 1) return;
  try {
    const from = Math.max(1, upTo - HISTORY_EVENTS + 1);
    const body = await api('/v1/events?from_seq=' + from + '&limit=' + HISTORY_EVENTS);
    state.feed = body.events.filter((e) => e.seq <= upTo).map((e) => ({
      seq: e.seq, type: e.type, library_id: e.library_id, timestamp: e.timestamp, data: e.data,
    }));
    state.feedDirty = true;
  } catch (_) { /* the stream still follows from the snapshot */ }
}

/** Re-reads one library soon (once for a burst of its events). */
function scheduleRefresh(id) {
  if (!id || state.refreshes.has(id)) return;
  state.refreshes.set(id, setTimeout(() => refreshLibrary(id), REFRESH_DELAY_MS));
}

async function refreshLibrary(id) {
  state.refreshes.delete(id);
  try {
    const library = await api('/v1/libraries/' + encodeURIComponent(id));
    const known = state.libraries.get(id);
    // A slower, older read never replaces a newer one.
    if (!known || known.seq <= library.seq) state.libraries.set(id, { library, seq: library.seq });
  } catch (error) {
    if (error.status === 404) state.libraries.delete(id);
  }
  state.librariesDirty = true;
  if (state.selected === id) loadIndexDetails();
}

function renderLibraries() {
  const rows = [...state.libraries.values()].sort((a, b) => a.library.name.localeCompare(b.library.name));
  const body = document.querySelector('#libraries tbody');
  body.replaceChildren(...rows.map(({ library, seq }) => {
    const tr = document.createElement('tr');
    tr.dataset.id = library.id;
    if (library.id === state.selected) tr.className = 'selected';
    const name = text('td', library.name, 'name');
    name.title = library.id;
    const index = library.index_type + (library.quantization ? ' · ' + library.quantization.type : '');
    tr.append(name, text('td', index), text('td', library.metric), text('td', library.dimension),
      text('td', library.num_documents, 'num'), text('td', library.num_chunks, 'num'),
      text('td', formatBytes(library.index && library.index.memory_bytes), 'num'), text('td', seq, 'num'));
    tr.addEventListener('click', () => { state.selected = library.id; state.librariesDirty = true; loadIndexDetails(); });
    return tr;
  }));
  byId('libraries-empty').hidden = rows.length > 0;
  byId('library-count').textContent = '(' + rows.length + ')';
  for (const select of [byId('search-library'), byId('filter-library')]) {
    const keep = select.value;
    const options = rows.map(({ library }) => {
      const option = text('option', library.name);
      option.value = library.id;
      return option;
    });
    if (select.id === 'filter-library') options.unshift(Object.assign(text('option', 'all'), { value: '' }));
    select.replaceChildren(...options);
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }
}

async function loadIndexDetails() {
  const panel = byId('index-details');
  const id = state.selected;
  if (!id) { panel.hidden = true; return; }
  try {
    const index = await api('/v1/libraries/' + encodeURIComponent(id) + '/index');
    if (state.selected !== id) return;
    const known = state.libraries.get(id);
    byId('index-library').textContent = known ? known.library.name : id;
    const build = index.build || {};
    const progress = build.progress ? ' ' + build.progress.percentage.toFixed(1) + ' %' : '';
    const fields = [
      ['type', index.index_type + (index.quantization ? ' · ' + index.quantization.type : '')],
      ['parameters', index.index_params ? JSON.stringify(index.index_params) : '–'],
      ['serving', index.serving],
      ['vectors', index.num_vectors],
      ['graph rows', index.graph_rows],
      ['tombstones', index.tombstones],
      ['memory (exact)', formatBytes(index.memory_bytes && index.memory_bytes.exact)],
      ['memory (graph)', formatBytes(index.memory_bytes && index.memory_bytes.graph)],
      ['build', (build.state || '–') + progress],
    ];
    byId('index-fields').replaceChildren(...fields.flatMap(([k, v]) => [text('dt', k), text('dd', v === undefined || v === null ? '–' : v)]));
    panel.hidden = false;
  } catch (error) {
    if (state.selected === id) {
      byId('index-fields').replaceChildren(text('dt', 'error'), text('dd', error.message));
      panel.hidden = false;
    }
  }
}

// ------------------------------------------------------------------ the event stream

function setStream(status, detail) {
  const node = byId('stream-state');
  node.dataset.state = status;
  node.textContent = detail ? status + ' (' + detail + ')' : status;
}

/** Applies one SSE frame; returns a reason to drop the connection, or null. */
function onFrame(frame) {
  let id = null;
  let type = 'message';
  const data = [];
  for (const line of frame.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'id') id = value;
    else if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
  }
  if (data.length === 0) return null;
  if (type === 'error' && id === null) {
    try { const body = JSON.parse(data.join('\n')); return body.detail || body.error || 'the server ended the stream'; } catch (_) { return 'the server ended the stream'; }
  }
  let envelope;
  try { envelope = JSON.parse(data.join('\n')); } catch (_) { return 'an event that is not JSON'; }
  const seq = Number(id !== null ? id : envelope.seq);
  if (!Number.isSafeInteger(seq)) return 'an event without a seq';
  // A resumed stream starts after the last seq seen; anything at or before it is not new.
  if (seq <= state.lastSeq) return null;
  state.lastSeq = seq;
  const event = { seq, type: envelope.type || type, library_id: envelope.library_id, timestamp: envelope.timestamp, data: envelope.data };
  state.feed.push(event);
  if (state.feed.length >= 2 * FEED_EVENTS_LIMIT) state.feed.splice(0, state.feed.length - FEED_EVENTS_LIMIT);
  countArrival(1);
  if (state.paused) state.pausedArrivals++;
  state.feedDirty = true;
  const family = event.type.split('.')[0];
  // Changes to a library's contents or index, and its jobs' progress (an index rebuild).
  if (family === 'library' || family === 'document' || family === 'chunk' || family === 'index' || family === 'job') {
    scheduleRefresh(event.library_id);
  }
  if (family === 'job') scheduleJobsRefresh();
  return null;
}

/** Reads frames until the stream ends; resolves to why it ended. */
async function readFrames(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return 'the server closed the stream';
    buffer += value;
    let start = 0;
    let end;
    while ((end = buffer.indexOf('\n\n', start)) >= 0) {
      const reason = onFrame(buffer.slice(start, end));
      start = end + 2;
      if (reason) { reader.cancel().catch(() => {}); return reason; }
    }
    buffer = buffer.slice(start);
    if (buffer.length > FRAME_CHARS_LIMIT) { reader.cancel().catch(() => {}); return 'an event larger than the page takes'; }
  }
}

async function streamLoop() {
  let backoff = RECONNECT_MS_MIN;
  for (;;) {
    let reason;
    try {
      const health = await api('/health');
      if (health.seq < state.lastSeq) {
        // Not the log this page followed (a new data directory): start from its snapshot.
        await loadSnapshot();
        state.feed = [];
        await loadHistory();
        state.feedDirty = true;
      }
      setStream('connecting');
      const response = await fetch('/v1/events/stream?from_seq=' + (state.lastSeq + 1), {
        headers: { accept: 'text/event-stream' }, cache: 'no-store',
      });
      if (response.status === 410) {
        // The resume point left the log's retention: the snapshot is the only way back.
        reason = await errorOf(response);
        const missedFrom = state.lastSeq + 1;
        await loadSnapshot();
        state.notice = 'events ' + missedFrom + '–' + state.lastSeq + ' left the log before the page read them; ' +
          'the libraries were re-read at seq ' + state.lastSeq;
      } else if (!response.ok) {
        reason = await errorOf(response);
      } else {
        setStream('live');
        backoff = RECONNECT_MS_MIN;
        reason = await readFrames(response.body);
      }
    } catch (error) {
      reason = error.message || String(error);
    }
    setStream('reconnecting', reason);
    await sleep(backoff);
    backoff = Math.min(backoff * 2, RECONNECT_MS_MAX);
  }
}

// ------------------------------------------------------------------ the feed

/** A predicate for the comma-separated type globs (`document.*`), or null for all. */
function typeMatcher(spec) {
  const globs = spec.split(',').map((s) => s.trim()).filter(Boolean);
  if (globs.length === 0) return null;
  const patterns = globs.map((g) => new RegExp('^' + g.split('*').map((p) => p.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*') + '$'));
  return (type) => patterns.some((p) => p.test(type));
}

function renderFeed() {
  const matchesType = typeMatcher(byId('filter-types').value);
  const library = byId('filter-library').value;
  const rows = [];
  for (let i = state.feed.length - 1; i >= 0 && rows.length < FEED_ROWS_LIMIT; i--) {
    const event = state.feed[i];
    if (library && event.library_id !== library) continue;
    if (matchesType && !matchesType(event.type)) continue;
    const tr = document.createElement('tr');
    tr.dataset.seq = String(event.seq);
    const known = event.library_id ? state.libraries.get(event.library_id) : null;
    let data = event.data === undefined ? '' : JSON.stringify(event.data);
    if (data.length > DATA_CHARS_SHOWN) data = data.slice(0, DATA_CHARS_SHOWN) + '…';
    // The time of day (UTC) in the row, the full RFC 3339 timestamp on hover.
    const time = text('td', (event.timestamp || '').slice(11, 23), 'time');
    time.title = event.timestamp || '';
    tr.append(text('td', event.seq, 'num'), time, text('td', event.type, 'type'),
      text('td', known ? known.library.name : (event.library_id || '')), text('td', data, 'data'));
    rows.push(tr);
  }
  document.querySelector('#events tbody').replaceChildren(...rows);
}

function togglePause() {
  state.paused = !state.paused;
  state.pausedArrivals = 0;
  byId('pause').textContent = state.paused ? 'Resume' : 'Pause';
  state.feedDirty = true;
}

/** Adds `n` arrivals to this second's counter, zeroing the counters of seconds gone by. */
function countArrival(n) {
  const second = Math.floor(Date.now() / 1000);
  const passed = Math.min(second - state.arrivalsSecond, RATE_WINDOW_SECONDS);
  for (let i = 1; i <= passed; i++) state.arrivals[(state.arrivalsSecond + i) % RATE_WINDOW_SECONDS] = 0;
  state.arrivalsSecond = Math.max(second, state.arrivalsSecond);
  state.arrivals[state.arrivalsSecond % RATE_WINDOW_SECONDS] += n;
}

function render() {
  countArrival(0);
  byId('last-seq').textContent = String(state.lastSeq);
  byId('rate').textContent = (state.arrivals.reduce((a, b) => a + b, 0) / RATE_WINDOW_SECONDS).toFixed(1);
  if (state.librariesDirty) { state.librariesDirty = false; renderLibraries(); state.feedDirty = true; }
  byId('feed-note').textContent = state.paused ? 'paused; ' + state.pausedArrivals + ' new since' : state.notice;
  if (state.feedDirty && !state.paused) { state.feedDirty = false; renderFeed(); }
}

// ------------------------------------------------------------------ search

async function search(submit) {
  submit.preventDefault();
  const status = byId('search-status');
  const table = byId('search-results');
  const library = byId('search-library').value;
  const raw = byId('search-query').value.trim();
  const request = { k: Number(byId('search-k').value) };
  try {
    if (!library) throw new Error('create a library first');
    if (raw.startsWith('[')) {
      let vector;
      try { vector = JSON.parse(raw); } catch (error) { throw new Error('the embedding is not a JSON array: ' + error.message); }
      request.embedding = vector;
    } else {
      request.query = raw;
    }
    const filter = byId('search-filter').value.trim();
    if (filter) {
      try { request.filter = JSON.parse(filter); } catch (error) { throw new Error('the filter is not JSON: ' + error.message); }
    }
  } catch (error) {
    status.textContent = error.message;
    status.className = 'error';
    return;
  }
  status.textContent = 'searching…';
  status.className = 'muted';
  try {
    const body = await api('/v1/libraries/' + encodeURIComponent(library) + '/search', request);
    status.textContent = body.results.length + ' of ' + body.total_results + ' results in ' +
      Number(body.query_time_ms).toFixed(2) + ' ms, consistent at seq ' + body.seq;
    status.className = 'ok';
    byId('search-results').querySelector('tbody').replaceChildren(...body.results.map((hit, i) => {
      const tr = document.createElement('tr');
      tr.append(text('td', i + 1, 'num'), text('td', Number(hit.distance).toFixed(4), 'num'),
        text('td', hit.document_title || hit.document_id), text('td', hit.chunk.text, 'chunk'),
        text('td', hit.chunk.metadata ? JSON.stringify(hit.chunk.metadata) : '', 'data'));
      return tr;
    }));
    table.hidden = false;
  } catch (error) {
    status.textContent = error.message;
    status.className = 'error';
    table.hidden = true;
  }
}

// ------------------------------------------------------------------ jobs

/** Re-reads the jobs list soon (once for a burst of job events). */
function scheduleJobsRefresh() {
  if (state.jobsRefresh) return;
  state.jobsRefresh = setTimeout(loadJobs, REFRESH_DELAY_MS);
}

async function loadJobs() {
  state.jobsRefresh = null;
  try {
    const body = await api('/v1/jobs?limit=' + JOBS_SHOWN);
    byId('jobs').querySelector('tbody').replaceChildren(...body.jobs.map((job) => {
      const tr = document.createElement('tr');
      tr.dataset.id = job.job_id;
      const known = job.library_id ? state.libraries.get(job.library_id) : null;
      const progress = job.progress && job.progress.total
        ? job.progress.current + ' / ' + job.progress.total + ' (' + Number(job.progress.percentage).toFixed(0) + ' %)'
        : '';
      const status = text('td', job.status + (job.error ? ': ' + job.error.error : ''), 'status');
      if (job.error) status.title = job.error.detail || '';
      tr.append(text('td', job.type), text('td', known ? known.library.name : (job.library_id || '')), status,
        text('td', progress, 'num'), text('td', (job.created_at || '').slice(11, 19), 'time'));
      return tr;
    }));
  } catch (_) { /* shown again at the next job event or stats poll */ }
}

// ------------------------------------------------------------------ the bus

async function pollStats() {
  for (;;) {
    try {
      const [stats, health] = await Promise.all([api('/v1/events/statistics'), api('/health')]);
      byId('version').textContent = 'v' + health.version + ' · up ' + health.uptime_seconds + ' s';
      byId('durable-seq').textContent = String(health.durable_seq);
      const latency = stats.delivery_latency_ms || {};
      const fields = [
        ['subscribers', stats.subscriber_count],
        ['consumer groups', stats.consumer_count],
        ['published', stats.total_published],
        ['delivered', stats.total_delivered],
        ['catch-ups from the log', stats.total_catch_ups],
        ['pending', stats.pending_events],
        ['retained seqs', stats.first_seq + ' … ' + stats.last_seq],
        ['delivery p50 / p99', (latency.p50 ?? '–') + ' / ' + (latency.p99 ?? '–') + ' ms'],
        ['errors', stats.total_errors],
      ];
      byId('bus').replaceChildren(...fields.flatMap(([k, v]) => [text('dt', k), text('dd', v === undefined || v === null ? '–' : v)]));
      byId('consumers').querySelector('tbody').replaceChildren(...(stats.consumers || []).map((c) => {
        const tr = document.createElement('tr');
        tr.append(text('td', c.name), text('td', c.position, 'num'), text('td', c.lag, 'num'),
          text('td', c.pending, 'num'), text('td', c.parked, 'num'), text('td', c.last_error || '', 'data'));
        return tr;
      }));
    } catch (error) {
      byId('bus').replaceChildren(text('dt', 'server'), text('dd', 'unreachable: ' + error.message));
    }
    await sleep(STATS_INTERVAL_MS);
  }
}

// ------------------------------------------------------------------ start

async function start() {
  byId('search-form').addEventListener('submit', search);
  byId('pause').addEventListener('click', togglePause);
  byId('filter-types').addEventListener('input', () => { state.feedDirty = true; });
  byId('filter-library').addEventListener('change', () => { state.feedDirty = true; });
  setInterval(render, RENDER_INTERVAL_MS);
  pollStats();
  for (let backoff = RECONNECT_MS_MIN; ; backoff = Math.min(backoff * 2, RECONNECT_MS_MAX)) {
    try { await loadSnapshot(); await loadHistory(); break; } catch (error) { setStream('reconnecting', error.message); await sleep(backoff); }
  }
  render();
  loadJobs();
  streamLoop();
}

start();
