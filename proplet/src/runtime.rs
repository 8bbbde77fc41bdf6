//! Runs a task's WebAssembly module in wasmi: a WASI preview 1 command
//! (`_start`) or one exported function, as upstream's proplet does with
//! wasmtime. Upstream's tasks are built for `wasm32-wasip1`, so WASI is what
//! makes them run; components (WASI preview 2) are refused with a clear error.
//!
//! Every piece of guest code (the start function, `_initialize`, the call)
//! runs in fuel slices: between slices we check the deadline and the stop
//! flag. That is how a task is timed out and stopped without a thread we
//! could not kill. Memory, tables, stdout and stderr are bounded; the module
//! sees only its arguments, its environment and the preopened directories.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::io::{self, IoSlice, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use wasmi::errors::{ErrorKind, LinkerError};
use wasmi::{
    Config, Engine, ExternType, Func, Instance, Linker, Module, ResumableCall, Store, StoreLimits,
    StoreLimitsBuilder, Val, ValType,
};
use wasmi_wasi::wasi_common::pipe::WritePipe;
use wasmi_wasi::wasi_common::sync::{self as wasi_sync, ambient_authority};
use wasmi_wasi::wasi_common::{self, Poll, Table, WasiCtx, WasiSched};

/// Fuel per slice: roughly one unit per instruction, so a few milliseconds of
/// work between checks of the deadline and the stop flag.
const FUEL_SLICE: u64 = 5_000_000;

/// How much of stderr an error line carries: its end says most.
const STDERR_IN_ERROR: usize = 2048;

/// What a task may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock time for the whole run, instantiation included.
    pub timeout: Duration,
    /// Linear memory, in bytes.
    pub max_memory: usize,
    /// Elements per table.
    pub max_table_elements: usize,
    /// Bytes kept of stdout, and separately of stderr.
    pub max_output: usize,
    /// Host directories preopened at the same guest path; empty = none.
    pub preopened: Vec<PathBuf>,
}

/// One task's call.
pub struct Invocation<'a> {
    /// The export to call; "" or "_start" runs the WASI command.
    pub function: &'a str,
    /// The function's arguments, as strings (upstream's wire form).
    pub inputs: &'a [String],
    /// The full argv the module sees, program name first.
    pub args: &'a [String],
    /// Environment variables.
    pub env: &'a [(String, String)],
}

/// Runs `invocation` on `module` within `limits`, checking `stopped` between
/// fuel slices. The result is what upstream's proplet reports: the returned
/// value as text (several as a JSON array), or the captured stdout when the
/// function returns nothing (a command).
///
/// # Errors
///
/// One line that says what went wrong: the module is a component, does not
/// load, imports what we do not provide, lacks the function, gets the wrong
/// inputs, traps, exits with a non-zero status, runs out of time, or was
/// stopped. Traps and exits carry the end of stderr.
pub fn run(
    module: &[u8],
    invocation: &Invocation<'_>,
    limits: &Limits,
    stopped: impl Fn() -> bool,
) -> Result<String, String> {
    // `None`: a timeout so large that it never comes (and `+` would panic).
    let deadline = Instant::now().checked_add(limits.timeout);
    if is_component(module) {
        return Err("the module is a WebAssembly component (WASI preview 2), which this proplet does not run: build it as a core module for wasm32-wasip1".to_owned());
    }
    let (bytes, start) = match detach_start(module) {
        Some((bytes, name)) => (Cow::Owned(bytes), Some(name)),
        None => (Cow::Borrowed(module), None),
    };
    let mut config = Config::default();
    config.consume_fuel(true);
    let engine = Engine::new(&config);
    let module =
        Module::new(&engine, &bytes[..]).map_err(|e| format!("the module does not load: {e}"))?;

    let stdout = Arc::new(RwLock::new(Capture::new(limits.max_output)));
    let stderr = Arc::new(RwLock::new(Capture::new(limits.max_output)));
    let slept_past_deadline = Arc::new(AtomicBool::new(false));
    let sched = Sched {
        deadline,
        slept_past_deadline: slept_past_deadline.clone(),
    };
    let wasi = wasi_ctx(invocation, limits, sched, &stdout, &stderr)?;
    let store_limits = StoreLimitsBuilder::new()
        .memory_size(limits.max_memory)
        .table_elements(limits.max_table_elements)
        .instances(1)
        .tables(4)
        .memories(1)
        .build();
    let mut store = Store::new(
        &engine,
        Host {
            wasi,
            limits: store_limits,
        },
    );
    store.limiter(|host| &mut host.limits);
    let mut linker = Linker::<Host>::new(&engine);
    wasmi_wasi::add_to_linker(&mut linker, |host: &mut Host| &mut host.wasi)
        .map_err(|e| format!("cannot provide WASI: {e}"))?;

    let mut task = Task {
        store,
        deadline,
        stopped: &stopped,
        slept_past_deadline,
    };
    let outcome = task.check().and_then(|()| {
        // The start section is detached, so this runs no guest code. Were it
        // not (a module we could not parse, which wasmi then rejects), the
        // fuel bounds it to one slice.
        task.store.set_fuel(FUEL_SLICE).map_err(Failure::other)?;
        let instance = linker
            .instantiate_and_start(&mut task.store, &module)
            .map_err(instantiation_error)?;
        task.execute(&module, instance, start.as_deref(), invocation)
    });

    let stderr_note = || {
        let text = one_line(&read(&stderr));
        if text.is_empty() {
            String::new()
        } else {
            format!("; stderr: {}", tail(&text, STDERR_IN_ERROR))
        }
    };
    match outcome {
        Ok(Done::Returned(values)) if !values.is_empty() => Ok(result_text(&values)),
        Ok(Done::Returned(_) | Done::Exited(0)) => Ok(read(&stdout)),
        Ok(Done::Exited(status)) => Err(format!(
            "the module exited with status {status}{}",
            stderr_note()
        )),
        Err(Failure::Trapped(trap)) => Err(format!("the module trapped: {trap}{}", stderr_note())),
        Err(Failure::TimedOut) => Err(format!(
            "timed out after {:?} (PROPLET_TASK_TIMEOUT)",
            limits.timeout
        )),
        Err(Failure::Stopped) => Err("stopped by the manager".to_owned()),
        Err(Failure::Refused(reason)) => Err(reason),
    }
}

/// A component starts like a core module but with another version/layer.
fn is_component(bytes: &[u8]) -> bool {
    bytes.get(..4) == Some(b"\0asm") && bytes.get(4..8).is_some_and(|v| v != [1, 0, 0, 0])
}

/// The store's data: WASI's state and the bounds wasmi asks about.
struct Host {
    wasi: WasiCtx,
    limits: StoreLimits,
}

/// argv, env, captured stdio and the preopens; nothing inherited from us.
fn wasi_ctx(
    invocation: &Invocation<'_>,
    limits: &Limits,
    sched: Sched,
    stdout: &Arc<RwLock<Capture>>,
    stderr: &Arc<RwLock<Capture>>,
) -> Result<WasiCtx, String> {
    // `WasiCtx::new` starts with an empty stdin and stdout/stderr that
    // discard; we replace the latter two.
    let mut ctx = WasiCtx::new(
        wasi_sync::random_ctx(),
        wasi_sync::clocks_ctx(),
        Box::new(sched),
        Table::new(),
    );
    for arg in invocation.args {
        ctx.push_arg(arg)
            .map_err(|e| format!("the task's arguments do not fit WASI: {e}"))?;
    }
    for (name, value) in invocation.env {
        ctx.push_env(name, value)
            .map_err(|e| format!("the task's environment does not fit WASI: {e}"))?;
    }
    ctx.set_stdout(Box::new(WritePipe::from_shared(stdout.clone())));
    ctx.set_stderr(Box::new(WritePipe::from_shared(stderr.clone())));
    for path in &limits.preopened {
        let dir = wasi_sync::Dir::open_ambient_dir(path, ambient_authority())
            .map_err(|e| format!("cannot preopen {} (PROPLET_DIRS): {e}", path.display()))?;
        ctx.push_preopened_dir(Box::new(wasi_sync::dir::Dir::from_cap_std(dir)), path)
            .map_err(|e| format!("cannot preopen {} (PROPLET_DIRS): {e}", path.display()))?;
    }
    Ok(ctx)
}

/// Names the import wasmi could not satisfy, rather than its internal form.
fn instantiation_error(error: wasmi::Error) -> Failure {
    Failure::Refused(match error.kind() {
        ErrorKind::Linker(LinkerError::MissingDefinition { name, .. }) => format!(
            "the module imports {}::{}, which this proplet does not provide (it provides WASI preview 1, wasi_snapshot_preview1)",
            name.module(),
            name.name()
        ),
        ErrorKind::Linker(LinkerError::InvalidTypeDefinition { name, .. }) => format!(
            "the module imports {}::{} with a type other than WASI's",
            name.module(),
            name.name()
        ),
        _ => format!("the module does not instantiate: {error}"),
    })
}

/// How guest code ended when it did not fail.
enum Done {
    /// The function returned these values.
    Returned(Vec<Val>),
    /// The module called WASI `proc_exit` with this status.
    Exited(i32),
}

enum Failure {
    Trapped(String),
    TimedOut,
    Stopped,
    /// Anything found before or around running guest code, said in full.
    Refused(String),
}

impl Failure {
    fn other(error: impl fmt::Display) -> Self {
        Self::Refused(error.to_string())
    }
}

/// A store and what each slice of guest code is checked against.
struct Task<'s, S: Fn() -> bool> {
    store: Store<Host>,
    deadline: Option<Instant>,
    stopped: &'s S,
    slept_past_deadline: Arc<AtomicBool>,
}

impl<S: Fn() -> bool> Task<'_, S> {
    /// The start function, then `_initialize` for a reactor, then the call.
    fn execute(
        &mut self,
        module: &Module,
        instance: Instance,
        start: Option<&str>,
        invocation: &Invocation<'_>,
    ) -> Result<Done, Failure> {
        // The start function completes instantiation, so it runs before
        // anything is looked up, as it would in wasmtime.
        if let Some(start) = start {
            let start = nullary(&instance, &self.store, start, "start function")?
                .ok_or_else(|| Failure::other("the module's start function went missing"))?;
            if let Some(status) = self.call(start, &[], &mut [])? {
                return Ok(Done::Exited(status));
            }
        }
        // Find the function and read its inputs before running more guest
        // code, so that a wrong task fails early.
        let (name, func) = choose(module, &instance, &self.store, invocation.function, start)?;
        let ty = func.ty(&self.store);
        if ty.params().len() != invocation.inputs.len() {
            return Err(Failure::Refused(format!(
                "{name} takes {} arguments, the task gives {}",
                ty.params().len(),
                invocation.inputs.len()
            )));
        }
        let args = ty
            .params()
            .iter()
            .zip(invocation.inputs)
            .enumerate()
            .map(|(i, (ty, input))| argument(*ty, input).map_err(|e| format!("input {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::Refused)?;
        if let Some(ty) = ty.results().iter().find(|ty| !is_number(**ty)) {
            return Err(Failure::Refused(format!(
                "{name} returns a {ty:?}, which a task result cannot carry"
            )));
        }
        let mut results: Vec<Val> = ty
            .results()
            .iter()
            .map(|ty| Val::default_for_ty(*ty))
            .collect();

        // A command (`_start`) initializes itself; a reactor needs this first.
        if name != "_start" {
            if let Some(init) = nullary(&instance, &self.store, "_initialize", "_initialize")? {
                if let Some(status) = self.call(init, &[], &mut [])? {
                    return Ok(Done::Exited(status));
                }
            }
        }
        Ok(match self.call(func, &args, &mut results)? {
            Some(status) => Done::Exited(status),
            None => Done::Returned(results),
        })
    }

    /// Runs `func` in fuel slices. `Some(status)`: it called `proc_exit`.
    fn call(
        &mut self,
        func: Func,
        params: &[Val],
        results: &mut [Val],
    ) -> Result<Option<i32>, Failure> {
        self.check()?;
        self.store.set_fuel(FUEL_SLICE).map_err(Failure::other)?;
        let mut call = func.call_resumable(&mut self.store, params, results);
        loop {
            match call {
                Ok(ResumableCall::Finished) => return Ok(None),
                Ok(ResumableCall::OutOfFuel(paused)) => {
                    self.check()?;
                    self.store
                        .set_fuel(FUEL_SLICE.max(paused.required_fuel()))
                        .map_err(Failure::other)?;
                    call = paused.resume(&mut self.store, results);
                }
                // wasmi_wasi turns wasi-common's `I32Exit` (from `proc_exit`)
                // into wasmi's i32 exit status; a resumable call hands every
                // host error back as a host trap.
                Ok(ResumableCall::HostTrap(trap)) => {
                    let error = trap.into_host_error();
                    if let Some(status) = error.i32_exit_status() {
                        return Ok(Some(status));
                    }
                    if self.slept_past_deadline.load(Ordering::Relaxed) {
                        return Err(Failure::TimedOut);
                    }
                    return Err(Failure::Trapped(error.to_string()));
                }
                Err(error) => {
                    if let Some(status) = error.i32_exit_status() {
                        return Ok(Some(status));
                    }
                    return Err(Failure::Trapped(error.to_string()));
                }
            }
        }
    }

    /// Between slices: has the manager stopped us, or has time run out?
    fn check(&self) -> Result<(), Failure> {
        if (self.stopped)() {
            return Err(Failure::Stopped);
        }
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            return Err(Failure::TimedOut);
        }
        Ok(())
    }
}

/// The function to call: the one asked for ("" means the command,
/// `_start`), else upstream's fallbacks `main`, `run`, `_start`.
fn choose(
    module: &Module,
    instance: &Instance,
    store: &Store<Host>,
    requested: &str,
    hidden: Option<&str>,
) -> Result<(String, Func), Failure> {
    let requested = if requested.is_empty() {
        "_start"
    } else {
        requested
    };
    let functions: Vec<&str> = module
        .exports()
        .filter(|export| matches!(export.ty(), ExternType::Func(_)))
        .map(|export| export.name())
        .filter(|name| Some(*name) != hidden)
        .collect();
    [requested, "main", "run", "_start"]
        .into_iter()
        .find(|name| functions.contains(name))
        .and_then(|name| Some((name.to_owned(), instance.get_func(store, name)?)))
        .ok_or_else(|| {
            Failure::Refused(format!(
                "the module exports no function {requested:?}, nor the fallbacks main, run, _start; its function exports: {functions:?}"
            ))
        })
}

/// An export that must take and return nothing, if the module has it.
fn nullary(
    instance: &Instance,
    store: &Store<Host>,
    name: &str,
    what: &str,
) -> Result<Option<Func>, Failure> {
    let Some(func) = instance.get_func(store, name) else {
        return Ok(None);
    };
    let ty = func.ty(store);
    if !ty.params().is_empty() || !ty.results().is_empty() {
        return Err(Failure::Refused(format!(
            "the module's {what} must take and return nothing"
        )));
    }
    Ok(Some(func))
}

fn is_number(ty: ValType) -> bool {
    matches!(
        ty,
        ValType::I32 | ValType::I64 | ValType::F32 | ValType::F64
    )
}

/// An input string as the parameter type wants it, as upstream parses it.
/// Integers above the signed range wrap, as our earlier numeric inputs did.
fn argument(ty: ValType, input: &str) -> Result<Val, String> {
    let text = input.trim();
    let wrong = |what: &str| format!("{input:?} is not an {what}");
    Ok(match ty {
        ValType::I32 => Val::I32(
            text.parse::<i32>()
                .or_else(|_| text.parse::<u32>().map(|n| n as i32))
                .map_err(|_| wrong("i32"))?,
        ),
        ValType::I64 => Val::I64(
            text.parse::<i64>()
                .or_else(|_| text.parse::<u64>().map(|n| n as i64))
                .map_err(|_| wrong("i64"))?,
        ),
        ValType::F32 => Val::F32(text.parse::<f32>().map_err(|_| wrong("f32"))?.into()),
        ValType::F64 => Val::F64(text.parse::<f64>().map_err(|_| wrong("f64"))?.into()),
        other => {
            return Err(format!(
                "the function takes a {other:?}, which tasks cannot pass"
            ))
        }
    })
}

/// One value as upstream prints it; several as a JSON array.
fn result_text(values: &[Val]) -> String {
    match values {
        [value] => number(value).unwrap_or_default(),
        values => {
            let items: Vec<String> = values
                .iter()
                .map(|value| match (value, number(value)) {
                    (Val::F32(f), _) if !f32::from(*f).is_finite() => "null".to_owned(),
                    (Val::F64(f), _) if !f64::from(*f).is_finite() => "null".to_owned(),
                    (_, Some(text)) => text,
                    (_, None) => "null".to_owned(),
                })
                .collect();
            format!("[{}]", items.join(","))
        }
    }
}

/// Rust's `Display`, which never uses exponents: valid JSON when finite.
fn number(value: &Val) -> Option<String> {
    match value {
        Val::I32(n) => Some(n.to_string()),
        Val::I64(n) => Some(n.to_string()),
        Val::F32(f) => Some(f32::from(*f).to_string()),
        Val::F64(f) => Some(f64::from(*f).to_string()),
        _ => None,
    }
}

/// A stdio stream kept in memory up to a bound. The guest is told every
/// write succeeded, so that it neither retries nor fails on a full buffer.
struct Capture {
    kept: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        let (keep, drop) = bytes.split_at(room.min(bytes.len()));
        self.kept.extend_from_slice(keep);
        self.dropped = self.dropped.saturating_add(drop.len() as u64);
    }

    fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            let _ = write!(text, "… [{} bytes dropped]", self.dropped);
        }
        text
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.take(buf);
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut written = 0usize;
        for buf in bufs {
            self.take(buf);
            written = written.saturating_add(buf.len());
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read(capture: &RwLock<Capture>) -> String {
    capture
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .text()
}

/// Error results are one line.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    Cow::Owned(format!("…{}", &text[cut..]))
}

/// WASI's scheduler with sleeps that end at the task's deadline: fuel does
/// not run out while a guest sleeps, so an hour's sleep would otherwise hold
/// the thread past PROPLET_TASK_TIMEOUT. A stop is noticed once the sleep
/// ends (we cannot call the non-`Send` stop check from here).
struct Sched {
    deadline: Option<Instant>,
    slept_past_deadline: Arc<AtomicBool>,
}

#[derive(Debug)]
struct SleptPastDeadline;

impl fmt::Display for SleptPastDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the module slept past its deadline")
    }
}

impl std::error::Error for SleptPastDeadline {}

impl Sched {
    fn nap(&self, duration: Duration) -> Result<(), wasi_common::Error> {
        let left = self.deadline.map_or(duration, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        if duration <= left {
            std::thread::sleep(duration);
            return Ok(());
        }
        std::thread::sleep(left);
        self.slept_past_deadline.store(true, Ordering::Relaxed);
        // A trap, not an errno: the guest must not go on after its time.
        Err(wasi_common::Error::trap(SleptPastDeadline.into()))
    }

    fn poll_clocks(&self, poll: &Poll<'_>) -> Result<(), wasi_common::Error> {
        if let Some(clock) = poll.earliest_clock_deadline() {
            // Until the earliest timer has fired, which is what poll reports.
            while let Some(left) = clock.duration_until().filter(|left| !left.is_zero()) {
                self.nap(left)?;
            }
        }
        Ok(())
    }
}

/// What `#[async_trait]` makes of an `async fn` in `WasiSched`; written out
/// so that we need no macro crate. Our futures are ready when first polled.
type Pending<'f> = Pin<Box<dyn Future<Output = Result<(), wasi_common::Error>> + Send + 'f>>;

impl WasiSched for Sched {
    fn poll_oneoff<'a, 'life0, 'life1, 'async_trait>(
        &'life0 self,
        poll: &'life1 mut Poll<'a>,
    ) -> Pending<'async_trait>
    where
        'a: 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            // Files (only preopened ones can be polled; our stdio cannot)
            // go to wasi-common's poll, which also honours their timers.
            if poll.rw_subscriptions().next().is_some() {
                wasi_sync::sched::poll_oneoff(poll).await
            } else {
                self.poll_clocks(poll)
            }
        })
    }

    fn sched_yield<'life0, 'async_trait>(&'life0 self) -> Pending<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        std::thread::yield_now();
        Box::pin(std::future::ready(Ok(())))
    }

    fn sleep<'life0, 'async_trait>(&'life0 self, duration: Duration) -> Pending<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(std::future::ready(self.nap(duration)))
    }
}

/// The name under which [`detach_start`] exports the start function.
const START_EXPORT: &str = "proplet:start";

/// wasmi 2 runs a module's start function inside instantiation, in one
/// non-resumable call that neither the deadline nor a stop could interrupt.
/// So we rewrite the module: drop its start section and export the start
/// function instead (under a name the module does not use), then call it
/// resumably right after instantiation, as the start section would have.
///
/// Returns `None` when there is no start section, or when the bytes do not
/// frame as a module (wasmi then says what is wrong with them).
fn detach_start(wasm: &[u8]) -> Option<(Vec<u8>, String)> {
    const HEADER: &[u8] = b"\0asm\x01\0\0\0";
    const EXPORT: u8 = 7;
    const START: u8 = 8;
    if !wasm.starts_with(HEADER) {
        return None;
    }
    // (id, the whole section, its contents)
    let mut sections = Vec::new();
    let mut reader = Reader::new(wasm.get(HEADER.len()..)?);
    while !reader.is_empty() {
        let begin = reader.pos;
        let id = reader.byte()?;
        let size = reader.u32()?;
        let contents = reader.bytes(usize::try_from(size).ok()?)?;
        sections.push((id, &reader.data[begin..reader.pos], contents));
    }
    let mut starts = sections.iter().filter(|(id, ..)| *id == START);
    let (_, _, start) = starts.next()?;
    if starts.next().is_some() {
        return None;
    }
    let mut start = Reader::new(start);
    let function = start.u32()?;
    if !start.is_empty() {
        return None;
    }

    // The existing exports: their count, their names, and their bytes.
    let exports = sections.iter().find(|(id, ..)| *id == EXPORT);
    let (count, entries, names) = match exports {
        Some((_, _, contents)) => {
            let mut reader = Reader::new(contents);
            let count = reader.u32()?;
            let entries = reader.rest();
            let mut names = Vec::new();
            for _ in 0..count {
                let len = reader.u32()?;
                names.push(reader.bytes(usize::try_from(len).ok()?)?);
                reader.byte()?;
                reader.u32()?;
            }
            (count, entries, names)
        }
        None => (0, &[][..], Vec::new()),
    };
    let name = (0u32..)
        .map(|n| match n {
            0 => START_EXPORT.to_owned(),
            n => format!("{START_EXPORT}#{n}"),
        })
        .find(|name| !names.contains(&name.as_bytes()))?;
    let mut contents = Vec::new();
    leb(&mut contents, count.checked_add(1)?);
    contents.extend_from_slice(entries);
    leb(&mut contents, u32::try_from(name.len()).ok()?);
    contents.extend_from_slice(name.as_bytes());
    contents.push(0); // a function
    leb(&mut contents, function);
    let mut section = vec![EXPORT];
    leb(&mut section, u32::try_from(contents.len()).ok()?);
    section.extend_from_slice(&contents);

    // The new exports replace the old ones or, if there were none, take the
    // start section's place, which is where export sections go.
    let mut out = HEADER.to_vec();
    for (id, whole, _) in &sections {
        match *id {
            EXPORT => out.extend_from_slice(&section),
            START if exports.is_none() => out.extend_from_slice(&section),
            START => {}
            _ => out.extend_from_slice(whole),
        }
    }
    Some((out, name))
}

/// Reads the module's framing; every read that runs out gives `None`.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }

    fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let bytes = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    /// Unsigned LEB128, at most five bytes, as the format's u32.
    fn u32(&mut self) -> Option<u32> {
        let mut value = 0u32;
        for shift in [0, 7, 14, 21, 28] {
            let byte = self.byte()?;
            if shift == 28 && byte & 0xf0 != 0 {
                return None;
            }
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

fn leb(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(5),
            max_memory: 16 << 20,
            max_table_elements: 100_000,
            max_output: 1 << 20,
            preopened: Vec::new(),
        }
    }

    fn quick() -> Limits {
        Limits {
            timeout: Duration::from_millis(200),
            ..limits()
        }
    }

    fn module(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Calls `function` with `inputs`, argv ["prog"], no env.
    fn call(bytes: &[u8], function: &str, inputs: &[&str]) -> Result<String, String> {
        call_with(bytes, function, inputs, &limits(), || false)
    }

    fn call_with(
        bytes: &[u8],
        function: &str,
        inputs: &[&str],
        limits: &Limits,
        stopped: impl Fn() -> bool,
    ) -> Result<String, String> {
        let inputs = strings(inputs);
        let args = strings(&["prog"]);
        let invocation = Invocation {
            function,
            inputs: &inputs,
            args: &args,
            env: &[],
        };
        run(bytes, &invocation, limits, stopped)
    }

    fn add() -> Vec<u8> {
        module(
            r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))"#,
        )
    }

    /// `run()`, failing the test if it has not returned within a minute: a
    /// guard against a hang, not a measure of speed.
    fn guarded<T: Send + 'static>(run: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, outcome) = std::sync::mpsc::channel();
        // Detached: a hung call must not keep the test from failing.
        std::thread::spawn(move || {
            let _ = done.send(run());
        });
        outcome
            .recv_timeout(Duration::from_secs(60))
            .expect("still running after a minute: a hang")
    }

    /// WASI imports and helpers for commands: `$print` writes a memory
    /// range to a file descriptor.
    const WASI: &str = r#"
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
        (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        ;; 16: iovec, 24: bytes written
        (func $print (param $fd i32) (param $ptr i32) (param $len i32)
          (i32.store (i32.const 16) (local.get $ptr))
          (i32.store (i32.const 20) (local.get $len))
          (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24))))
        (func $strlen (param $p i32) (result i32) (local $n i32)
          (block $end (loop $next
            (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))
            (br $next)))
          (local.get $n))
        ;; sleeps $ns nanoseconds on the monotonic clock (subscription at 256)
        (func $sleep (param $ns i64)
          (i32.store (i32.const 272) (i32.const 1))
          (i64.store (i32.const 280) (local.get $ns))
          (drop (call $poll_oneoff (i32.const 256) (i32.const 320) (i32.const 1) (i32.const 24))))
        (data (i32.const 32) " \n")
    "#;

    fn command(body: &str) -> Vec<u8> {
        module(&format!("(module {WASI} {body})"))
    }

    #[test]
    fn a_wasi_command_sees_its_arguments_and_environment() {
        // Prints argv[1..] separated by spaces, a newline, then the value of
        // the first environment variable (after its '=').
        let echo = command(
            r#"
            (func (export "_start") (local $i i32) (local $p i32)
              (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
              (drop (call $args_get (i32.const 64) (i32.const 1024)))
              (local.set $i (i32.const 1))
              (block $end (loop $next
                (br_if $end (i32.ge_u (local.get $i) (i32.load (i32.const 0))))
                (if (i32.gt_u (local.get $i) (i32.const 1))
                  (then (call $print (i32.const 1) (i32.const 32) (i32.const 1))))
                (local.set $p (i32.load (i32.add (i32.const 64) (i32.shl (local.get $i) (i32.const 2)))))
                (call $print (i32.const 1) (local.get $p) (call $strlen (local.get $p)))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $next)))
              (call $print (i32.const 1) (i32.const 33) (i32.const 1))
              (drop (call $environ_sizes_get (i32.const 8) (i32.const 12)))
              (drop (call $environ_get (i32.const 128) (i32.const 2048)))
              (local.set $p (i32.load (i32.const 128)))
              (block $end (loop $next
                (br_if $end (i32.eq (i32.load8_u (local.get $p)) (i32.const 61)))
                (local.set $p (i32.add (local.get $p) (i32.const 1)))
                (br $next)))
              (local.set $p (i32.add (local.get $p) (i32.const 1)))
              (call $print (i32.const 1) (local.get $p) (call $strlen (local.get $p)))
              (call $print (i32.const 1) (i32.const 33) (i32.const 1)))
            "#,
        );
        let args = strings(&["prog", "hello", "world"]);
        let env = [("GREETING".to_owned(), "hi".to_owned())];
        for function in ["_start", ""] {
            let invocation = Invocation {
                function,
                inputs: &[],
                args: &args,
                env: &env,
            };
            assert_eq!(
                run(&echo, &invocation, &limits(), || false),
                Ok("hello world\nhi\n".to_owned())
            );
        }
    }

    #[test]
    fn proc_exit_ends_the_run_with_its_status() {
        let exit = |status: i32| {
            command(&format!(
                r#"(data (i32.const 40) "out\n" "bad input\n")
                (func (export "_start")
                  (call $print (i32.const 1) (i32.const 40) (i32.const 4))
                  (call $print (i32.const 2) (i32.const 44) (i32.const 10))
                  (call $proc_exit (i32.const {status}))
                  unreachable)"#
            ))
        };
        assert_eq!(
            call(&exit(3), "_start", &[]),
            Err("the module exited with status 3; stderr: bad input".to_owned())
        );
        // Status 0 is success, and the result is stdout.
        assert_eq!(call(&exit(0), "_start", &[]), Ok("out\n".to_owned()));
    }

    #[test]
    fn a_reactor_is_initialized_before_its_function() {
        let reactor = module(
            r#"(module (global $g (mut i32) (i32.const 0))
                 (func (export "_initialize") (global.set $g (i32.const 42)))
                 (func (export "get") (result i32) (global.get $g)))"#,
        );
        assert_eq!(call(&reactor, "get", &[]), Ok("42".to_owned()));
    }

    #[test]
    fn string_inputs_are_parsed_to_the_parameter_types() {
        assert_eq!(call(&add(), "add", &["3", "4"]), Ok("7".to_owned()));
        // The u32 range wraps into i32.
        assert_eq!(
            call(&add(), "add", &["4294967295", "0"]),
            Ok("-1".to_owned())
        );
        let error = call(&add(), "add", &["x", "1"]).unwrap_err();
        assert_eq!(error, "input 0: \"x\" is not an i32");
        let twice = module(
            r#"(module (func (export "twice") (param f64) (result f64) local.get 0 local.get 0 f64.add)
                 (func (export "wide") (param i64) (result i64) local.get 0))"#,
        );
        assert_eq!(call(&twice, "twice", &["1.5"]), Ok("3".to_owned()));
        assert_eq!(
            call(&twice, "wide", &["18446744073709551615"]),
            Ok("-1".to_owned())
        );
        assert!(call(&twice, "twice", &["1,5"])
            .unwrap_err()
            .contains("is not an f64"));
    }

    #[test]
    fn results_are_text_as_upstream_sends_them() {
        let pair = module(
            r#"(module (func (export "pair") (param i64) (result i64 f64) local.get 0 f64.const 0.5)
                 (func (export "f") (result f32) f32.const 0.1))"#,
        );
        assert_eq!(call(&pair, "pair", &["-2"]), Ok("[-2,0.5]".to_owned()));
        assert_eq!(call(&pair, "f", &[]), Ok("0.1".to_owned()));
    }

    #[test]
    fn missing_functions_fall_back_like_upstream() {
        let main = module(r#"(module (func (export "main") (result i32) i32.const 5))"#);
        assert_eq!(call(&main, "absent", &[]), Ok("5".to_owned()));
        let error = call(&add(), "sub", &[]).unwrap_err();
        assert!(error.contains("no function \"sub\""), "{error}");
        assert!(error.contains("[\"add\"]"), "{error}");
    }

    #[test]
    fn every_failure_is_an_error_not_a_panic() {
        let err =
            |bytes: &[u8], name: &str, inputs: &[&str]| call(bytes, name, inputs).unwrap_err();
        assert!(err(b"not wasm", "add", &[]).starts_with("the module does not load"));
        assert!(err(b"\0asm\x01\0\0\0\x08\x01", "f", &[]).starts_with("the module does not load"));
        assert!(err(&add(), "add", &["1"]).contains("add takes 2 arguments, the task gives 1"));
        assert!(err(&add(), "add", &["1", "1.5"]).starts_with("input 1:"));
        let trap = module(r#"(module (func (export "boom") unreachable))"#);
        assert!(err(&trap, "boom", &[]).starts_with("the module trapped"));
        let unknown = module(r#"(module (import "env" "f" (func)) (func (export "g")))"#);
        let error = err(&unknown, "g", &[]);
        assert!(error.contains("imports env::f"), "{error}");
        let no_such = module(r#"(module (import "wasi_snapshot_preview1" "no_such" (func)))"#);
        let error = err(&no_such, "", &[]);
        assert!(error.contains("wasi_snapshot_preview1::no_such"), "{error}");
        let refs = module(r#"(module (func (export "r") (param externref)))"#);
        assert!(err(&refs, "r", &["1"]).contains("cannot pass"));
        // A WASI call without an exported memory is a trap, not a panic.
        let memoryless = module(
            r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (import "wasi_snapshot_preview1" "sched_yield" (func $yield (result i32)))
                 (func (export "_start") (drop (call $yield))))"#,
        );
        assert!(err(&memoryless, "_start", &[]).starts_with("the module trapped"));
        let greedy = module(
            r#"(module (memory (export "m") 1) (func (export "grow") (result i32) i32.const 1000 memory.grow))"#,
        );
        // Refused growth is -1 in WebAssembly, not a trap.
        assert_eq!(call(&greedy, "grow", &[]), Ok("-1".to_owned()));
    }

    #[test]
    fn a_trap_carries_stderr() {
        let failing = command(
            r#"(data (i32.const 40) "panicked at src/main.rs\nnote: backtrace\n")
            (func (export "_start")
              (call $print (i32.const 2) (i32.const 40) (i32.const 40))
              unreachable)"#,
        );
        let error = call(&failing, "_start", &[]).unwrap_err();
        assert!(error.starts_with("the module trapped: "), "{error}");
        assert!(
            error.ends_with("; stderr: panicked at src/main.rs | note: backtrace"),
            "{error}"
        );
    }

    #[test]
    fn output_is_bounded() {
        // Writes 100 bytes 100 times.
        let chatty = command(
            r#"(func (export "_start") (local $i i32)
              (block $end (loop $next
                (br_if $end (i32.eq (local.get $i) (i32.const 100)))
                (call $print (i32.const 1) (i32.const 1024) (i32.const 100))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $next))))"#,
        );
        let small = Limits {
            max_output: 1000,
            ..limits()
        };
        let output = call_with(&chatty, "_start", &[], &small, || false).unwrap();
        assert!(output.ends_with("… [9000 bytes dropped]"), "{output}");
        assert_eq!(output.len(), 1000 + "… [9000 bytes dropped]".len());
    }

    #[test]
    fn components_are_refused() {
        let error = call(b"\0asm\x0d\0\x01\0", "", &[]).unwrap_err();
        assert!(error.contains("WebAssembly component"), "{error}");
        assert!(error.contains("wasm32-wasip1"), "{error}");
    }

    #[test]
    fn huge_tables_are_refused_without_allocating() {
        let table = module("(module (table 4294967295 funcref))");
        let error = guarded(move || call(&table, "", &[])).unwrap_err();
        assert!(
            error.starts_with("the module does not instantiate"),
            "{error}"
        );
        let many = module("(module (memory 1) (memory 1))");
        assert!(call(&many, "", &[]).is_err());
    }

    #[test]
    fn the_start_function_runs_before_the_call() {
        let started = module(
            r#"(module (global $g (mut i32) (i32.const 0))
                 (func $s (global.set $g (i32.const 7))) (start $s)
                 (func (export "get") (result i32) (global.get $g)))"#,
        );
        assert_eq!(call(&started, "get", &[]), Ok("7".to_owned()));
        // Its export stays internal.
        let error = call(&started, "proplet:start", &[]).unwrap_err();
        assert!(
            error.ends_with("its function exports: [\"get\"]"),
            "{error}"
        );
    }

    #[test]
    fn endless_loops_time_out_and_stop() {
        let spin = module(r#"(module (func (export "spin") (loop (br 0))))"#);
        let in_start = module("(module (func $s (loop (br 0))) (start $s))");
        for (bytes, function) in [(&spin, "spin"), (&in_start, "")] {
            let module = bytes.clone();
            let error =
                guarded(move || call_with(&module, function, &[], &quick(), || false)).unwrap_err();
            assert_eq!(error, "timed out after 200ms (PROPLET_TASK_TIMEOUT)");
            let error = call_with(bytes, function, &[], &limits(), || true).unwrap_err();
            assert_eq!(error, "stopped by the manager");
        }
    }

    #[test]
    fn sleeps_end_at_the_deadline() {
        let sleeper = |ns: u64| {
            command(&format!(
                r#"(func (export "_start") (call $sleep (i64.const {ns})))"#
            ))
        };
        let hour = sleeper(3_600_000_000_000);
        let error =
            guarded(move || call_with(&hour, "_start", &[], &quick(), || false)).unwrap_err();
        assert!(error.starts_with("timed out"), "{error}");
        // A short sleep just sleeps.
        let started = Instant::now();
        assert_eq!(call(&sleeper(20_000_000), "_start", &[]), Ok(String::new()));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn detaching_the_start_keeps_other_exports_and_skips_used_names() {
        let taken = module(
            r#"(module (func $s) (start $s) (func (export "proplet:start") (result i32) i32.const 1))"#,
        );
        let (_, name) = detach_start(&taken).unwrap();
        assert_eq!(name, "proplet:start#1");
        assert_eq!(call(&taken, "proplet:start", &[]), Ok("1".to_owned()));
        assert!(detach_start(&add()).is_none());
    }
}
