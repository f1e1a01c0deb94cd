//! What every benchmark measures with, written once: the latency loop, a process's CPU from
//! `/proc/<pid>/stat`, the machine line (cores, CPU model, load average), the bench's own child
//! processes (started by the bench, and the child modes' side: their logging and their command
//! lines), and callgrind's instruction-counting switch (`KMSGATE_BENCH_CALLGRIND`).

use std::{
    future::Future,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

/// One run's latency distribution and throughput.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// 99.9th percentile latency.
    pub p999: Duration,
    /// Calls per second over the whole run.
    pub per_second: f64,
}

/// Runs `ops` calls of `call` (given the call's index) spread over `concurrency` tasks; the
/// latency of each call, and calls per second over the whole run.
pub async fn run<F, Fut>(concurrency: usize, ops: usize, call: F) -> Sample
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(ops / concurrency + 1);
            let mut i = worker;
            while i < ops {
                let at = Instant::now();
                call(i).await;
                latencies.push(at.elapsed());
                i += concurrency;
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for task in tasks {
        all.extend(task.await.expect("a bench worker panicked"));
    }
    let wall = started.elapsed();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Sample { p50: at(0.50), p99: at(0.99), p999: at(0.999), per_second: ops as f64 / wall.as_secs_f64() }
}

/// The run with the median p50 of `samples` (so the figures reported belong together), and its
/// index in `samples`.
pub fn median_run(samples: &[Sample]) -> (usize, Sample) {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].p50);
    let at = order[order.len() / 2];
    (at, samples[at])
}

/// The median of `values`.
pub fn median<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN among the measurements"));
    values[values.len() / 2]
}

/// CPU seconds (user + system, every thread, living or exited) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process is alive");
    stat_seconds(&stat, 14)
}

/// CPU seconds (user + system) of this process's children that have been waited for.
pub fn children_cpu_seconds() -> f64 {
    stat_seconds(&std::fs::read_to_string("/proc/self/stat").expect("our own stat"), 16)
}

/// Fields `first` and `first + 1` (1-based, as proc(5) numbers them) of a `/proc/<pid>/stat`
/// line, in seconds.
fn stat_seconds(stat: &str, first: usize) -> f64 {
    // NB: the command name (field 2) may hold spaces; the fields after its ')' are fixed, and
    // the first of them is field 3.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<f64>().expect("a number of clock ticks");
    (field(first) + field(first + 1)) / clock_ticks()
}

/// CPU microseconds per call that each of `pids` spent while `work` ran.
pub async fn cpu_per_call<T>(pids: &[u32], calls: usize, work: impl Future<Output = T>) -> (T, Vec<f64>) {
    let before: Vec<f64> = pids.iter().map(|&pid| cpu_seconds(pid)).collect();
    let out = work.await;
    let per_call =
        pids.iter().zip(before).map(|(&pid, b)| (cpu_seconds(pid) - b) * 1e6 / calls as f64).collect();
    (out, per_call)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The CPU model, as `lscpu` names it (`model name` in `/proc/cpuinfo`).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.trim() == "model name").map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1, 5 and 15 minute load averages, as `uptime` shows them.
pub fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The machine a figure comes from: cores, CPU model and the load average now.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {}, load average {}", cpu_model(), load_average())
}

/// Where callgrind profiles go, when the bench runs under `scripts/profile-*.sh`.
pub fn callgrind_dir() -> Option<PathBuf> {
    std::env::var_os("KMSGATE_BENCH_CALLGRIND").map(PathBuf::from)
}

/// Switches callgrind's instruction counting of `pid` on or off (off also dumps, named `label`);
/// does nothing unless profiling.
pub fn callgrind(pid: u32, on: bool, label: &str) {
    if callgrind_dir().is_none() {
        return;
    }
    let pid = pid.to_string();
    let switch = if on { "on" } else { "off" };
    let quiet =
        |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("callgrind_control");
    let status = quiet(Command::new("callgrind_control").args(["-i", switch, &pid]));
    assert!(status.success(), "callgrind_control -i {switch} {pid}");
    if !on {
        let dump = format!("--dump={label}");
        let status = quiet(Command::new("callgrind_control").args([dump.as_str(), &pid]));
        assert!(status.success(), "callgrind_control --dump {pid}");
    }
}

/// This bench's own binary in a child mode (`echo`, `direct`, ...), under callgrind when
/// profiling; killed on drop. The child prints `ready` once it serves, and `done` after each
/// command line it is given.
pub struct ChildProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildProcess {
    /// Starts `<this bench> <mode> <args…>` and waits for its `ready`.
    pub fn start(mode: &str, args: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("the bench's own path");
        let mut command = match callgrind_dir() {
            Some(dir) => {
                let mut c = Command::new("valgrind");
                c.args(["--tool=callgrind", "--instr-atstart=no", "--quiet"])
                    .arg(format!("--callgrind-out-file={}/{mode}.%p", dir.display()))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg(mode)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the bench's child process starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut me = Self { child, stdin, stdout };
        me.wait_for("ready");
        me
    }

    fn wait_for(&mut self, word: &str) {
        let mut line = String::new();
        while line.trim() != word {
            line.clear();
            let read = self.stdout.read_line(&mut line).expect("the child's stdout");
            assert!(read > 0, "child exited before {word:?}");
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line and waits for the child's `done`.
    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("the child's stdin");
        self.stdin.flush().expect("the child's stdin");
        self.wait_for("done");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bench's own arguments: its child mode or the sections to run (cargo's `--bench` is none).
pub fn args() -> Vec<String> {
    std::env::args().skip(1).filter(|a| a != "--bench").collect()
}

/// Runs a child mode to its end on `runtime`, logging as the servers do at their default level.
/// NB: with no subscriber at all, h2's and hyper's disabled log sites cost more per call than the
/// servers' filter does, which would flatter the floor.
pub fn child_mode(runtime: &tokio::runtime::Runtime, mode: impl Future<Output = ()>) {
    kmsgate::telemetry::init("info", false);
    runtime.block_on(mode)
}

/// A child mode's next command line from the parent (read on a blocking thread), split into
/// words; `None` once the parent closes stdin.
pub async fn next_command() -> Option<Vec<String>> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .expect("the stdin reader panicked")
    .unwrap_or_default();
    (!line.is_empty()).then(|| line.split_whitespace().map(str::to_owned).collect())
}

/// Milliseconds, for tables.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
