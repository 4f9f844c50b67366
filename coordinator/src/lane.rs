//! One lane's driver: a task that owns the lane's [`Scheduler`] (its queue, running sequences
//! and KV-block accounting), plans steps, keeps up to `P` of them in flight through the
//! lane's pipeline (stage 0's worker forwards to the next stages), applies what comes back and
//! streams each request's updates to its client. A client that goes away, or whose deadline
//! passes, has its sequence dropped and its KV blocks freed at once.
//!
//! Each request's stream holds at most [`OUTPUT_UPDATES`] updates its client has not read.
//! When it is full the request is paused (no more steps; what it already generated waits
//! here, at most one update per step in flight); it goes on once its client reads, and is
//! cancelled when the client has not read for [`STALL_TIMEOUT`].
//!
//! A step that fails or does not answer within the step timeout means a worker of the
//! placement is in trouble: the lane stops stepping, keeps its sequences and reports the
//! failure; the cluster then stops the lane ([`Lane::stop`]), which hands every sequence back,
//! with what its client has seen, to be recomputed on the next placement.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchyard_net::{trace_context, wire};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use switchyard_scheduler::kv_blocks::{BlockHash, CacheChange, SeqId};
use switchyard_scheduler::step::SeqWork;
use switchyard_scheduler::{Detached, Scheduler, Update, ValidRequest};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, info_span, warn, Instrument, Span};

use crate::metrics::{Metrics, RequestRecord, RequestTimes};

/// What a request's stream receives: updates, or the status it ends with.
pub type Outcome = Result<Update, Status>;

/// Updates a request's stream holds before its generation pauses: its client is not reading.
pub const OUTPUT_UPDATES: usize = 64;

/// A request whose client has read nothing of its full stream for this long is cancelled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The stream of a request's outcomes, bounded by [`OUTPUT_UPDATES`].
pub fn outcome_stream() -> (mpsc::Sender<Outcome>, mpsc::Receiver<Outcome>) {
    mpsc::channel(OUTPUT_UPDATES)
}

/// A sequence is recomputed on a new placement at most this many times; a step failure that
/// follows it everywhere is not a lost worker.
pub const MAX_MOVES: u32 = 5;

/// A request handed to a lane: new, or moved from a lane that stopped.
pub struct Admitted {
    pub work: Work,
    pub life: RequestLife,
}

/// Who a request is for and its life so far; it goes with the request from lane to lane.
pub struct RequestLife {
    pub request_id: String,
    /// The request's span: open until its last outcome; every step serving it links to it.
    pub span: Span,
    pub deadline: Option<Instant>,
    pub out: mpsc::Sender<Outcome>,
    /// Updates waiting for room in `out`, and since when it has been full.
    pub held: VecDeque<Outcome>,
    pub stalled_since: Option<Instant>,
    /// Placements it was moved off so far.
    pub moves: u32,
    /// Its life so far (arrival, first token…), for the metrics.
    pub times: RequestTimes,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl RequestLife {
    /// Sends the request's last outcome. It waits its turn behind what is held, for as long
    /// as a stalled client is given; the caller does not wait for it.
    pub fn close(self, last: Outcome) {
        let (out, mut held) = (self.out, self.held);
        held.push_back(last);
        tokio::spawn(async move {
            for outcome in held {
                match tokio::time::timeout(STALL_TIMEOUT, out.send(outcome)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        });
    }
}

pub enum Work {
    New(ValidRequest),
    Moved(Detached),
}

impl Admitted {
    pub fn id(&self) -> SeqId {
        match &self.work {
            Work::New(r) => r.id,
            Work::Moved(d) => d.id(),
        }
    }

    /// What the lane computes: the prompt, and for a moved request what it generated so far.
    pub fn tokens(&self) -> &[u32] {
        match &self.work {
            Work::New(r) => &r.prompt,
            Work::Moved(d) => d.tokens(),
        }
    }
}

/// A lane's report that a step failed: some worker of the placement is in trouble.
#[derive(Debug, Clone)]
pub struct LaneFailure {
    pub epoch: u64,
    pub lane: usize,
    pub reason: String,
}

/// How a lane is driven.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    pub lane: usize,
    pub epoch: u64,
    pub max_in_flight: usize,
    /// A step without an answer by then counts as failed.
    pub step_timeout: Duration,
}

/// Figures of a lane, refreshed by its driver after every change.
#[derive(Debug, Clone, Default)]
pub struct LaneStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub preemptions: u64,
}

/// The API's handle on a lane.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::UnboundedSender<Message>,
    /// Handed over but not yet taken by the driver.
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<LaneStats>>,
    /// Set while one of the lane's workers drains: it takes no new requests.
    draining: Arc<AtomicBool>,
    /// The blocks its prefix cache holds, as of the driver's last turn: what routing looks at.
    cached: Arc<RwLock<HashSet<BlockHash>>>,
}

enum Message {
    Admit(Box<Admitted>),
    /// Hand every request back and end.
    Stop(oneshot::Sender<Vec<Admitted>>),
}

impl Lane {
    /// Starts the driver of a lane whose stage-0 worker is `stage0`; step failures go to
    /// `failures`.
    pub fn spawn(
        mut scheduler: Scheduler,
        stage0: WorkerClient<Channel>,
        config: LaneConfig,
        failures: mpsc::UnboundedSender<LaneFailure>,
        metrics: Arc<Metrics>,
    ) -> Lane {
        let (tx, rx) = mpsc::unbounded_channel();
        let lane = Lane {
            tx,
            pending: Arc::default(),
            stats: Arc::default(),
            draining: Arc::default(),
            cached: Arc::default(),
        };
        scheduler.blocks_mut().track_changes();
        let label = config.lane.to_string();
        // The lane's series exist from its start, so a rate over them sees its first steps.
        metrics.step_seconds.with(&[&label]);
        let driver = Driver {
            label,
            metrics,
            preemptions_seen: 0,
            prefix_seen: (0, 0),
            cached: lane.cached.clone(),
            scheduler,
            stage0,
            max_in_flight: config.max_in_flight.max(1),
            config,
            lives: HashMap::new(),
            in_flight: JoinSet::new(),
            next_step: 0,
            pending: lane.pending.clone(),
            stats: lane.stats.clone(),
            failures,
            failed: false,
        };
        tokio::spawn(driver.run(rx));
        lane
    }

    /// Hands a request to the lane; gives it back if the lane has stopped.
    pub fn submit(&self, admitted: Admitted) -> Result<(), Box<Admitted>> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send(Message::Admit(Box::new(admitted)))
            .map_err(|e| {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                match e.0 {
                    Message::Admit(a) => a,
                    Message::Stop(_) => unreachable!("sent an Admit"),
                }
            })
    }

    /// Ends the lane's driver; every request it held comes back, to be moved elsewhere.
    pub async fn stop(&self) -> Vec<Admitted> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Stop(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Nothing queued, running or on its way.
    pub fn is_idle(&self) -> bool {
        self.load() == 0
    }

    pub fn stats(&self) -> LaneStats {
        self.stats.lock().expect("not poisoned").clone()
    }

    /// Requests not running yet: in the lane's queue or on their way to it.
    pub fn queued(&self) -> usize {
        self.pending.load(Ordering::SeqCst) + self.stats().waiting
    }

    /// How many of `hashes` (a prompt's full blocks, chained) lead its prefix cache holds.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        let cached = self.cached.read().expect("not poisoned");
        hashes.iter().take_while(|h| cached.contains(h)).count()
    }

    /// Requests on this lane, running or queued.
    pub fn load(&self) -> usize {
        self.pending.load(Ordering::SeqCst) + {
            let s = self.stats();
            s.waiting + s.running
        }
    }
}

type StepOutcome = (Vec<SeqWork>, Instant, Result<pb::StepResponse, Status>);

struct Driver {
    /// The lane's index as the metrics' label value.
    label: String,
    metrics: Arc<Metrics>,
    preemptions_seen: u64,
    /// The scheduler's prefix-cache counts already added to the metrics.
    prefix_seen: (u64, u64),
    cached: Arc<RwLock<HashSet<BlockHash>>>,
    scheduler: Scheduler,
    stage0: WorkerClient<Channel>,
    config: LaneConfig,
    max_in_flight: usize,
    lives: HashMap<SeqId, RequestLife>,
    in_flight: JoinSet<StepOutcome>,
    next_step: u64,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<LaneStats>>,
    failures: mpsc::UnboundedSender<LaneFailure>,
    /// A step failed: no more steps until the lane is stopped.
    failed: bool,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
        // Wakes the loop to notice clients that went away or ran out of time.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Ok(m) = rx.try_recv() {
                if let Some(reply) = self.receive(m) {
                    return self.stop(rx, reply);
                }
            }
            self.flush_held();
            self.drop_gone_clients();
            self.launch();
            self.publish_stats();
            tokio::select! {
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match done {
                        Ok((work, started, result)) => {
                            self.metrics
                                .step_seconds
                                .with(&[&self.label])
                                .observe(started.elapsed().as_secs_f64());
                            self.finish_step(work, result)
                        }
                        Err(e) => warn!("a step task failed: {e}"),
                    }
                }
                m = rx.recv() => match m {
                    Some(m) => if let Some(reply) = self.receive(m) {
                        return self.stop(rx, reply);
                    },
                    // Every handle is gone: nobody can see these requests' outcome any more.
                    None => return,
                },
                _ = tick.tick() => {}
            }
        }
    }

    /// Handles a message; a stop request is returned.
    fn receive(&mut self, m: Message) -> Option<oneshot::Sender<Vec<Admitted>>> {
        match m {
            Message::Admit(a) => {
                self.admit(*a);
                None
            }
            Message::Stop(reply) => Some(reply),
        }
    }

    /// Hands back every request (running ones lose their KV; results of steps in flight are
    /// dropped) and ends.
    fn stop(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Message>,
        reply: oneshot::Sender<Vec<Admitted>>,
    ) {
        rx.close();
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Message::Admit(a) => {
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    out.push(*a);
                }
                Message::Stop(other) => drop(other),
            }
        }
        for d in self.scheduler.detach_all() {
            if let Some(c) = self.lives.remove(&d.id()) {
                out.push(Admitted {
                    work: Work::Moved(d),
                    life: RequestLife {
                        moves: c.moves + 1,
                        ..c
                    },
                });
            }
        }
        self.in_flight.abort_all();
        *self.stats.lock().expect("not poisoned") = LaneStats::default();
        self.cached.write().expect("not poisoned").clear();
        let _ = reply.send(out);
    }

    fn admit(&mut self, a: Admitted) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let id = a.id();
        let c = &a.life;
        debug!(request_id = %c.request_id, seq = id, moves = c.moves, "admitted");
        self.lives.insert(id, a.life);
        match a.work {
            Work::New(r) => self.scheduler.add(r),
            Work::Moved(d) => {
                if let Err(e) = self.scheduler.adopt(d) {
                    // Ended like any other request: counted, recorded, its span closed.
                    self.end(
                        id,
                        Err(Status::unavailable(format!(
                            "the placement changed and the new one cannot hold this request: {e}"
                        ))),
                    );
                }
            }
        }
    }

    fn drop_gone_clients(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (id, c) in &self.lives {
            if c.out.is_closed() {
                debug!(request_id = %c.request_id, "client went away; cancelled");
                gone.push((*id, Status::cancelled("the client went away")));
            } else if c.deadline.is_some_and(|d| d <= now) {
                gone.push((
                    *id,
                    Status::deadline_exceeded("the request's deadline passed before it finished"),
                ));
            } else if c.stalled_since.is_some_and(|t| now - t >= STALL_TIMEOUT) {
                debug!(request_id = %c.request_id, "client stopped reading; cancelled");
                gone.push((
                    *id,
                    Status::cancelled(format!(
                        "the client read nothing of its stream for {STALL_TIMEOUT:?}; cancelled"
                    )),
                ));
            }
        }
        for (id, status) in gone {
            self.end(id, Err(status));
            self.scheduler.cancel(id);
        }
    }

    fn launch(&mut self) {
        while !self.failed && self.in_flight.len() < self.max_in_flight {
            let work = self.scheduler.plan();
            if work.is_empty() {
                return;
            }
            let lives: Vec<&RequestLife> =
                work.iter().filter_map(|w| self.lives.get(&w.id)).collect();
            let request = pb::StepRequest {
                epoch: self.config.epoch,
                step_id: self.next_step,
                seqs: work.iter().map(wire::seq_work).collect(),
                hidden: None,
                request_ids: lives.iter().map(|c| c.request_id.clone()).collect(),
            };
            // A step serves many requests: it is its own trace (through every worker it
            // passes), linked to each request's span.
            let span = info_span!(
                "step",
                lane = self.config.lane,
                epoch = self.config.epoch,
                id = request.step_id,
                requests = ?request.request_ids,
            );
            for c in lives {
                span.follows_from(&c.span);
            }
            let request = trace_context::request(&span, request);
            self.next_step += 1;
            let now = Instant::now();
            for w in &work {
                if let Some(c) = self.lives.get_mut(&w.id) {
                    c.times.scheduled(&self.metrics, now);
                }
            }
            let mut stage0 = self.stage0.clone();
            let timeout = self.config.step_timeout;
            self.in_flight.spawn(
                async move {
                    let result = match tokio::time::timeout(timeout, stage0.step(request)).await {
                        Ok(r) => r.map(|r| r.into_inner()),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "a step got no answer within {timeout:?}"
                        ))),
                    };
                    (work, now, result)
                }
                .instrument(span),
            );
        }
    }

    fn finish_step(&mut self, work: Vec<SeqWork>, result: Result<pb::StepResponse, Status>) {
        let results = match result {
            Ok(r) if r.results.len() == work.len() => {
                r.results.iter().map(wire::from_seq_result).collect()
            }
            Ok(r) => {
                let n = r.results.len();
                return self.fail_step(
                    &work,
                    Status::internal(format!("{n} results for {} sequences", work.len())),
                );
            }
            // The request itself is at fault: it fails alone.
            Err(s) if s.code() == Code::InvalidArgument => return self.fail_step(&work, s),
            Err(s) => return self.lane_failed(&s),
        };
        let updates = match self.scheduler.apply(&work, results) {
            Ok(u) => u,
            Err(e) => return self.fail_step(&work, Status::internal(e.to_string())),
        };
        let now = Instant::now();
        for u in updates {
            let id = u.id;
            let finish = u
                .finish
                .as_ref()
                .map(|(reason, _)| reason.as_str().to_string());
            let Some(c) = self.lives.get_mut(&id) else {
                continue;
            };
            c.times.tokens(&self.metrics, u.token_ids.len(), now);
            c.completion_tokens += u.token_ids.len();
            if let Some(reason) = finish {
                self.metrics.success.with(&[&reason]).inc();
                self.end(id, Ok(u));
            } else {
                c.held.push_back(Ok(u));
                if !deliver(c) {
                    self.scheduler.pause(id, true);
                }
            }
        }
    }

    /// Moves held updates into streams that have room again; their requests go on.
    fn flush_held(&mut self) {
        for (id, c) in &mut self.lives {
            if c.stalled_since.is_some() {
                let caught_up = deliver(c);
                self.scheduler.pause(*id, !caught_up);
            }
        }
    }

    /// Sends a request's last outcome and records it.
    fn end(&mut self, id: SeqId, last: Outcome) {
        let Some(c) = self.lives.remove(&id) else {
            return;
        };
        let m = &self.metrics;
        let outcome = match &last {
            Ok(u) => u
                .finish
                .as_ref()
                .map_or("stop", |(reason, _)| reason.as_str())
                .to_string(),
            Err(status) => {
                let code = code_label(status.code());
                m.failure.with(&[&code]).inc();
                code
            }
        };
        c.span.record("outcome", outcome.as_str());
        c.span.record("completion_tokens", c.completion_tokens);
        if last.is_err() {
            c.span.record("otel.status_code", "error");
        }
        let e2e = c.times.arrived.elapsed().as_secs_f64();
        if last.is_ok() {
            m.e2e.observe(e2e);
            m.prompt_tokens.add(c.prompt_tokens as u64);
        }
        m.record(RequestRecord {
            request_id: c.request_id.clone(),
            lane: self.config.lane,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            outcome,
            ttft_s: c
                .times
                .first_token
                .map(|t| t.duration_since(c.times.arrived).as_secs_f64()),
            e2e_s: e2e,
            finished_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        });
        c.close(last);
    }

    /// A worker of the placement failed this step: stop stepping and report it. The step's
    /// sequences stay as they were before it (its results never come), to be recomputed.
    /// Nothing is applied: the sequences stay marked in flight until the lane is stopped.
    fn lane_failed(&mut self, status: &Status) {
        if self.failed {
            return;
        }
        self.failed = true;
        let reason = format!("{:?}: {}", status.code(), status.message());
        warn!(lane = self.config.lane, epoch = self.config.epoch, %reason, "step failed; waiting for a new placement");
        let _ = self.failures.send(LaneFailure {
            epoch: self.config.epoch,
            lane: self.config.lane,
            reason,
        });
    }

    /// Ends the requests of a step that could not run, with the reason.
    fn fail_step(&mut self, work: &[SeqWork], status: Status) {
        warn!(error = %status.message(), "step failed");
        let results = vec![Default::default(); work.len()];
        for w in work {
            self.end(w.id, Err(status.clone()));
            self.scheduler.cancel(w.id);
        }
        // Clears the in-flight marks; cancelled sequences yield no updates.
        let _ = self.scheduler.apply(work, results);
    }

    fn publish_stats(&mut self) {
        let blocks = self.scheduler.blocks();
        let stats = LaneStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            kv_blocks_total: blocks.num_blocks(),
            kv_blocks_used: blocks.num_blocks() - blocks.num_free(),
            preemptions: self.scheduler.num_preemptions(),
        };
        let (m, lane) = (&self.metrics, &[self.label.as_str()]);
        m.running.with(lane).set(stats.running as f64);
        m.waiting.with(lane).set(stats.waiting as f64);
        m.kv_usage
            .with(lane)
            .set(stats.kv_blocks_used as f64 / stats.kv_blocks_total.max(1) as f64);
        m.preemptions
            .add(stats.preemptions.saturating_sub(self.preemptions_seen));
        self.preemptions_seen = stats.preemptions;
        let (queries, hits) = self.scheduler.prefix_cache_counts();
        m.prefix_cache_queries
            .add(queries.saturating_sub(self.prefix_seen.0));
        m.prefix_cache_hits
            .add(hits.saturating_sub(self.prefix_seen.1));
        self.prefix_seen = (queries, hits);
        let changes = self.scheduler.blocks_mut().take_changes();
        if !changes.is_empty() {
            let mut cached = self.cached.write().expect("not poisoned");
            for change in changes {
                match change {
                    CacheChange::Added(h) => cached.insert(h),
                    CacheChange::Evicted(h) => cached.remove(&h),
                };
            }
        }
        *self.stats.lock().expect("not poisoned") = stats;
    }
}

/// Sends what `c` holds while its stream has room; whether all of it went. The stall clock
/// runs from the last time the client made room; a closed stream is dropped by
/// `drop_gone_clients`.
fn deliver(c: &mut RequestLife) -> bool {
    let mut sent = false;
    while let Some(outcome) = c.held.pop_front() {
        match c.out.try_send(outcome) {
            Ok(()) => sent = true,
            Err(mpsc::error::TrySendError::Full(outcome)) => {
                c.held.push_front(outcome);
                match (sent, &mut c.stalled_since) {
                    (false, Some(_)) => {}
                    (_, since) => *since = Some(Instant::now()),
                }
                return false;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => c.held.clear(),
        }
    }
    c.stalled_since = None;
    true
}

/// A status code as a metric label: `resource_exhausted`, `deadline_exceeded`, …
pub fn code_label(code: tonic::Code) -> String {
    switchyard_proto::code_name(code).to_ascii_lowercase()
}
