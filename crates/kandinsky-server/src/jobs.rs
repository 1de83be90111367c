//! The job queue: a bounded FIFO of generation jobs served one at a time by a worker thread that
//! keeps the models it has loaded, with live progress, previews and cancellation per job.

use crate::catalog::Catalog;
use crate::images::png_base64;
use kandinsky::pipelines::auto_pipeline::{AutoPipeline, DecoderKind, LoadOptions, Request, Stage};
use kandinsky::pipelines::{CancelFlag, Preview};
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::Rgb8;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use utoipa::ToSchema;

/// One generation of a job: a library request and the seed of its generator.
#[derive(Debug, Clone)]
pub struct Run {
    /// The request.
    pub request: Request,
    /// The seed of the `torch.Generator`-compatible generator shared by prior and decoder.
    pub seed: u64,
}

/// What a job runs: one or more generations on one model and decoder kind.
#[derive(Debug, Clone)]
pub struct Work {
    /// The model's name in the catalog.
    pub model: String,
    /// The decoder the runs need.
    pub kind: DecoderKind,
    /// The generations, in order (an A1111 batch is one run per seed).
    pub runs: Vec<Run>,
    /// The PNG `parameters` text of each run's images.
    pub infotexts: Vec<String>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Being generated.
    Running,
    /// Finished with images.
    Done,
    /// Finished with an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobState {
    /// Done, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The images of a finished job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The images, PNG-encoded with their `parameters` text chunk.
    pub pngs: Vec<Vec<u8>>,
    /// The seed of each image's generation.
    pub seeds: Vec<u64>,
    /// Width and height of the images.
    pub size: (usize, usize),
}

/// The live state of a job.
#[derive(Debug, Clone)]
pub struct Status {
    /// Where the job is.
    pub state: JobState,
    /// The stage running.
    pub stage: Option<Stage>,
    /// Steps done in the stage.
    pub step: usize,
    /// Steps of the stage.
    pub steps: usize,
    /// Which run of the job is going (0-based) and how many there are.
    pub run: (usize, usize),
    /// When the current stage started.
    pub stage_started: Option<Instant>,
    /// When the job started running.
    pub started: Option<Instant>,
    /// The latest preview, base64 PNG.
    pub preview: Option<String>,
    /// The result of a finished job.
    pub output: Option<Arc<JobOutput>>,
    /// Why the job failed.
    pub error: Option<String>,
}

impl Status {
    /// Seconds left in the current stage, from its pace so far.
    pub fn eta(&self) -> Option<f64> {
        let started = self.stage_started?;
        if self.step == 0 || self.steps == 0 {
            return None;
        }
        let elapsed = started.elapsed().as_secs_f64();
        Some(elapsed / self.step as f64 * (self.steps - self.step) as f64)
    }

    /// The fraction done over all runs (the prior counts for a fifth of a run).
    pub fn fraction(&self) -> f64 {
        let within = match self.stage {
            None => 0.0,
            Some(stage) => {
                let f = self.step as f64 / self.steps.max(1) as f64;
                match stage {
                    Stage::Prior => 0.2 * f,
                    Stage::Decoder => 0.2 + 0.8 * f,
                }
            }
        };
        match self.state {
            JobState::Done => 1.0,
            _ => ((self.run.0 as f64 + within) / self.run.1.max(1) as f64).min(1.0),
        }
    }
}

/// A job in the queue or finished.
pub struct Job {
    /// Its id.
    pub id: String,
    /// What it runs.
    pub work: Work,
    /// Its live state.
    pub status: Mutex<Status>,
    /// Bumped on every change of `status`, for the event streams.
    pub changes: watch::Sender<u64>,
    /// Set to cancel it.
    pub cancel: CancelFlag,
    /// Set to end the current generation early with its unfinished image (A1111 interrupt/skip).
    pub interrupt: CancelFlag,
    /// Set to run no further generations of the job (A1111 interrupt).
    pub stop_after: AtomicBool,
    /// When it was submitted (for the A1111 `job_timestamp`).
    pub submitted: std::time::SystemTime,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// A copy of the live state.
    pub fn snapshot(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the job is done, failed or cancelled.
    pub async fn finished(&self) -> Status {
        let mut rx = self.changes.subscribe();
        loop {
            let s = self.snapshot();
            if s.state.is_final() {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.snapshot();
            }
        }
    }
}

/// Why a job was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue holds its maximum of waiting jobs.
    #[error("the queue is full ({0} jobs waiting); try again later")]
    Full(usize),
}

struct Inner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
}

/// The queue shared by the HTTP handlers and the worker.
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Condvar,
    capacity: usize,
    next_id: AtomicU64,
    shutdown: AtomicBool,
    /// Seconds the last job took (for `Retry-After`).
    last_duration: Mutex<f64>,
}

/// Finished jobs kept for their results.
const KEEP_FINISHED: usize = 64;

impl Queue {
    /// An empty queue holding at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                waiting: VecDeque::new(),
                running: None,
                jobs: HashMap::new(),
                finished: VecDeque::new(),
            }),
            wake: Condvar::new(),
            capacity,
            next_id: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            last_duration: Mutex::new(10.0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job, or refuses when the queue is full.
    pub fn submit(&self, work: Work) -> Result<Arc<Job>, SubmitError> {
        let mut inner = self.lock();
        if inner.waiting.len() >= self.capacity {
            return Err(SubmitError::Full(inner.waiting.len()));
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (changes, _) = watch::channel(0);
        let runs = work.runs.len();
        let job = Arc::new(Job {
            id: format!("job-{n}"),
            work,
            status: Mutex::new(Status {
                state: JobState::Queued,
                stage: None,
                step: 0,
                steps: 0,
                run: (0, runs),
                stage_started: None,
                started: None,
                preview: None,
                output: None,
                error: None,
            }),
            changes,
            cancel: Arc::new(AtomicBool::new(false)),
            interrupt: Arc::new(AtomicBool::new(false)),
            stop_after: AtomicBool::new(false),
            submitted: std::time::SystemTime::now(),
        });
        inner.waiting.push_back(job.clone());
        inner.jobs.insert(job.id.clone(), job.clone());
        drop(inner);
        self.wake.notify_all();
        Ok(job)
    }

    /// A job by id (queued, running or among the last finished).
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().jobs.get(id).cloned()
    }

    /// The job running now.
    pub fn running(&self) -> Option<Arc<Job>> {
        self.lock().running.clone()
    }

    /// Jobs waiting ahead of this one (0 = next), `None` when it is not waiting.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.lock().waiting.iter().position(|j| j.id == id)
    }

    /// Waiting jobs.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Seconds a client should wait before retrying a refused job.
    pub fn retry_after(&self) -> u64 {
        let d = *self.last_duration.lock().unwrap_or_else(|e| e.into_inner());
        (d.ceil() as u64).clamp(1, 3600)
    }

    /// Cancels a job: a waiting one leaves the queue at once, a running one stops before its next
    /// step. Returns false when it had already finished.
    pub fn cancel(&self, job: &Arc<Job>) -> bool {
        let mut inner = self.lock();
        if job.snapshot().state.is_final() {
            return false;
        }
        job.cancel.store(true, Ordering::Relaxed);
        if let Some(i) = inner.waiting.iter().position(|j| j.id == job.id) {
            inner.waiting.remove(i);
            Self::finish(&mut inner, job);
            drop(inner);
            job.update(|s| s.state = JobState::Cancelled);
            self.notify_positions();
        }
        true
    }

    fn finish(inner: &mut Inner, job: &Arc<Job>) {
        inner.finished.push_back(job.id.clone());
        while inner.finished.len() > KEEP_FINISHED {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }

    /// Tells every waiting job's listeners that positions moved.
    fn notify_positions(&self) {
        let waiting: Vec<_> = self.lock().waiting.iter().cloned().collect();
        for job in waiting {
            job.changes.send_modify(|v| *v += 1);
        }
    }

    /// A1111's interrupt (`and_stop`) or skip: the running generation ends before its next step
    /// with its unfinished image; with `and_stop` no further generation of the job runs.
    pub fn interrupt(&self, and_stop: bool) {
        if let Some(job) = self.running() {
            if and_stop {
                job.stop_after.store(true, Ordering::Relaxed);
            }
            job.interrupt.store(true, Ordering::Relaxed);
        }
    }

    /// Stops the worker after its current job.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        if let Some(job) = self.running() {
            job.cancel.store(true, Ordering::Relaxed);
        }
        self.wake.notify_all();
    }

    fn next(&self) -> Option<Arc<Job>> {
        let mut inner = self.lock();
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(job) = inner.waiting.pop_front() {
                inner.running = Some(job.clone());
                return Some(job);
            }
            inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self, job: &Arc<Job>, seconds: f64) {
        let mut inner = self.lock();
        inner.running = None;
        Self::finish(&mut inner, job);
        drop(inner);
        *self.last_duration.lock().unwrap_or_else(|e| e.into_inner()) = seconds;
        self.notify_positions();
    }
}

/// Steps between live previews of the decoder (A1111 shows one every 10 steps).
fn preview_every(steps: usize) -> usize {
    (steps / 10).clamp(2, 10)
}

/// The longest side of a preview image.
const PREVIEW_SIDE: usize = 256;

/// The worker: runs queued jobs one after the other on the catalog's models, keeping up to
/// `max_loaded` pipelines in memory (least recently used dropped first).
pub fn spawn_worker(
    queue: Arc<Queue>,
    catalog: Arc<Catalog>,
    options: LoadOptions,
    max_loaded: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kandinsky-worker".into())
        .spawn(move || {
            let mut loaded: Vec<((String, DecoderKind), AutoPipeline)> = Vec::new();
            while let Some(job) = queue.next() {
                let start = Instant::now();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_job(&job, &catalog, &options, &mut loaded, max_loaded)
                }));
                let (state, error, output) = match result {
                    Ok(Ok(output)) => (JobState::Done, None, Some(Arc::new(output))),
                    Ok(Err(kandinsky::Error::Cancelled)) => (JobState::Cancelled, None, None),
                    Ok(Err(e)) => (JobState::Failed, Some(e.to_string()), None),
                    Err(panic) => {
                        // A panic may leave a pipeline half-updated: drop them all.
                        loaded.clear();
                        let what = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown".into());
                        (
                            JobState::Failed,
                            Some(format!("internal error: {what}")),
                            None,
                        )
                    }
                };
                queue.done(&job, start.elapsed().as_secs_f64());
                job.update(|s| {
                    s.state = state;
                    s.error = error;
                    s.output = output;
                    s.preview = None;
                });
            }
        })
        .expect("spawning the worker thread")
}

fn run_job(
    job: &Arc<Job>,
    catalog: &Catalog,
    options: &LoadOptions,
    loaded: &mut Vec<((String, DecoderKind), AutoPipeline)>,
    max_loaded: usize,
) -> kandinsky::Result<JobOutput> {
    job.update(|s| {
        s.state = JobState::Running;
        s.started = Some(Instant::now());
    });
    let key = (job.work.model.clone(), job.work.kind);
    let pipe = match loaded.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            let entry = loaded.remove(i);
            loaded.push(entry);
            &mut loaded.last_mut().expect("pushed").1
        }
        None => {
            let dirs = catalog.dirs(&key.0, key.1)?;
            let pipe = AutoPipeline::from_pretrained(
                &dirs.decoder,
                &dirs.prior,
                LoadOptions {
                    keep_loaded: true,
                    ..options.clone()
                },
            )?;
            while loaded.len() >= max_loaded.max(1) {
                loaded.remove(0);
            }
            loaded.push((key, pipe));
            &mut loaded.last_mut().expect("pushed").1
        }
    };
    pipe.set_cancel_flag(job.cancel.clone());
    pipe.set_interrupt_flag(job.interrupt.clone());
    let mut output = JobOutput {
        pngs: Vec::new(),
        seeds: Vec::new(),
        size: (0, 0),
    };
    let runs = job.work.runs.len();
    for (r, run) in job.work.runs.iter().enumerate() {
        if job.stop_after.load(Ordering::Relaxed) {
            break;
        }
        let preview_job = job.clone();
        pipe.set_preview(Some(Preview {
            every: preview_every(run.request.params.steps),
            sink: Arc::new(move |_, _, image: Rgb8| {
                let small = shrink(&image, PREVIEW_SIDE);
                if let Ok(b64) = png_base64(&small, &[]) {
                    preview_job.update(|s| s.preview = Some(b64));
                }
            }),
        }));
        let mut generator = TorchGenerator::new(run.seed);
        let mut progress = |stage: Stage, step: usize, steps: usize| {
            job.update(|s| {
                if s.stage != Some(stage) || step < s.step {
                    s.stage_started = Some(Instant::now());
                }
                s.stage = Some(stage);
                s.step = step;
                s.steps = steps;
                s.run = (r, runs);
            });
        };
        job.update(|s| {
            s.run = (r, runs);
            s.stage = None;
            s.step = 0;
        });
        let images = pipe.generate(run.request.clone(), &mut generator, &mut progress)?;
        let info = &job.work.infotexts[r];
        for image in &images {
            output.size = (image.width, image.height);
            output.pngs.push(kandinsky::vae_image_processor::encode_png(
                image,
                &[("parameters", info)],
            )?);
            output.seeds.push(run.seed);
        }
        // A skip ends only this generation.
        job.interrupt.store(false, Ordering::Relaxed);
    }
    pipe.set_preview(None);
    Ok(output)
}

/// `image` scaled down (nearest) so its longest side is at most `side`.
fn shrink(image: &Rgb8, side: usize) -> Rgb8 {
    let longest = image.width.max(image.height);
    if longest <= side {
        return image.clone();
    }
    let (w, h) = (
        (image.width * side / longest).max(1),
        (image.height * side / longest).max(1),
    );
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let sy = y * image.height / h;
        for x in 0..w {
            let sx = x * image.width / w;
            let i = (sy * image.width + sx) * 3;
            data.extend_from_slice(&image.data[i..i + 3]);
        }
    }
    Rgb8 {
        width: w,
        height: h,
        data,
    }
}
