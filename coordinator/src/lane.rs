//! One lane's driver: a task that owns the lane's [`Scheduler`] (its queue, running sequences
//! and KV-block accounting), plans steps, keeps up to `P` of them in flight through the
//! lane's pipeline (stage 0's worker forwards to the next stages), applies what comes back and
//! streams each request's updates to its client. A client that goes away, or whose deadline
//! passes, has its sequence dropped and its KV blocks freed at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use switchyard_worker::batch::SeqWork;
use switchyard_worker::kv_cache::SeqId;
use switchyard_worker::{wire, Request, Scheduler, Update};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{debug, warn};

use crate::metrics::{Metrics, RequestRecord, RequestTimes};

/// What a request's stream receives: updates, or the status it ends with.
pub type Outcome = Result<Update, Status>;

/// A request handed to a lane.
pub struct Admitted {
    pub request: Request,
    pub request_id: String,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    pub out: mpsc::UnboundedSender<Outcome>,
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
    tx: mpsc::UnboundedSender<Admitted>,
    /// Handed over but not yet taken by the driver.
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<LaneStats>>,
}

impl Lane {
    /// Starts the driver of lane `index`, whose stage-0 worker is `stage0`.
    pub fn spawn(
        index: usize,
        scheduler: Scheduler,
        stage0: WorkerClient<Channel>,
        epoch: u64,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Lane {
        let (tx, rx) = mpsc::unbounded_channel();
        let lane = Lane {
            tx,
            pending: Arc::default(),
            stats: Arc::default(),
        };
        let driver = Driver {
            index,
            label: index.to_string(),
            metrics,
            preemptions_seen: 0,
            scheduler,
            stage0,
            epoch,
            max_in_flight: max_in_flight.max(1),
            clients: HashMap::new(),
            in_flight: JoinSet::new(),
            next_step: 0,
            pending: lane.pending.clone(),
            stats: lane.stats.clone(),
        };
        tokio::spawn(driver.run(rx));
        lane
    }

    pub fn submit(&self, admitted: Admitted) -> Result<(), Status> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.tx.send(admitted).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            Status::unavailable("this lane has stopped")
        })
    }

    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    pub fn stats(&self) -> LaneStats {
        self.stats.lock().expect("not poisoned").clone()
    }

    /// Requests not running yet: in the lane's queue or on their way to it.
    pub fn queued(&self) -> usize {
        self.pending.load(Ordering::SeqCst) + self.stats().waiting
    }

    /// Requests on this lane, running or queued.
    pub fn load(&self) -> usize {
        self.pending.load(Ordering::SeqCst) + {
            let s = self.stats();
            s.waiting + s.running
        }
    }
}

struct Client {
    request_id: String,
    deadline: Option<Instant>,
    out: mpsc::UnboundedSender<Outcome>,
    prompt_tokens: usize,
    completion_tokens: usize,
    times: RequestTimes,
}

type StepOutcome = (Vec<SeqWork>, Instant, Result<pb::StepResponse, Status>);

struct Driver {
    index: usize,
    /// `index` as the metrics' label value.
    label: String,
    metrics: Arc<Metrics>,
    preemptions_seen: u64,
    scheduler: Scheduler,
    stage0: WorkerClient<Channel>,
    epoch: u64,
    max_in_flight: usize,
    clients: HashMap<SeqId, Client>,
    in_flight: JoinSet<StepOutcome>,
    next_step: u64,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<LaneStats>>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Admitted>) {
        // Wakes the loop to notice clients that went away or ran out of time.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            while let Ok(a) = rx.try_recv() {
                self.admit(a);
            }
            self.drop_gone_clients();
            self.launch();
            self.publish_stats();
            if !open && self.scheduler.is_idle() && self.in_flight.is_empty() {
                return;
            }
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
                a = rx.recv(), if open => match a {
                    Some(a) => self.admit(a),
                    None => open = false,
                },
                _ = tick.tick() => {}
            }
        }
    }

    fn admit(&mut self, a: Admitted) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let id = a.request.id;
        debug!(request_id = %a.request_id, seq = id, "admitted");
        self.clients.insert(
            id,
            Client {
                request_id: a.request_id,
                deadline: a.deadline,
                out: a.out,
                prompt_tokens: a.request.prompt.len(),
                completion_tokens: 0,
                times: RequestTimes::new(a.arrived),
            },
        );
        self.scheduler.add(a.request);
    }

    fn drop_gone_clients(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (id, c) in &self.clients {
            if c.out.is_closed() {
                debug!(request_id = %c.request_id, "client went away; cancelled");
                gone.push((*id, Status::cancelled("the client went away")));
            } else if c.deadline.is_some_and(|d| d <= now) {
                gone.push((
                    *id,
                    Status::deadline_exceeded("the request's deadline passed before it finished"),
                ));
            }
        }
        for (id, status) in gone {
            self.end(id, Err(status));
            self.scheduler.cancel(id);
        }
    }

    fn launch(&mut self) {
        while self.in_flight.len() < self.max_in_flight {
            let work = self.scheduler.plan();
            if work.is_empty() {
                return;
            }
            let request = pb::StepRequest {
                epoch: self.epoch,
                step_id: self.next_step,
                seqs: work.iter().map(wire::seq_work).collect(),
                hidden: None,
                request_ids: work
                    .iter()
                    .filter_map(|w| self.clients.get(&w.id).map(|c| c.request_id.clone()))
                    .collect(),
            };
            self.next_step += 1;
            let now = Instant::now();
            for w in &work {
                if let Some(c) = self.clients.get_mut(&w.id) {
                    c.times.scheduled(&self.metrics, now);
                }
            }
            let mut stage0 = self.stage0.clone();
            self.in_flight.spawn(async move {
                let result = stage0.step(request).await.map(|r| r.into_inner());
                (work, now, result)
            });
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
            Err(s) => {
                let status = Status::unavailable(format!("a worker failed: {}", s.message()));
                return self.fail_step(&work, status);
            }
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
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            c.times.tokens(&self.metrics, u.token_ids.len(), now);
            c.completion_tokens += u.token_ids.len();
            if let Some(reason) = finish {
                self.metrics.success.with(&[&reason]).inc();
                self.end(id, Ok(u));
            } else {
                let _ = c.out.send(Ok(u));
            }
        }
    }

    /// Sends a request's last outcome and records it.
    fn end(&mut self, id: SeqId, last: Outcome) {
        let Some(c) = self.clients.remove(&id) else {
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
                let code = code_name(status.code());
                m.failure.with(&[&code]).inc();
                code
            }
        };
        let e2e = c.times.arrived.elapsed().as_secs_f64();
        if last.is_ok() {
            m.e2e.observe(e2e);
            m.prompt_tokens.add(c.prompt_tokens as u64);
        }
        m.record(RequestRecord {
            request_id: c.request_id,
            lane: self.index,
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
        let _ = c.out.send(last);
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
        *self.stats.lock().expect("not poisoned") = stats;
    }
}

/// A status code as a metric label: `resource_exhausted`, `deadline_exceeded`, …
pub fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_lowercase());
    }
    name
}
