//! Stop signals: SIGINT (Ctrl-C), SIGTERM (Slurm preemption, `docker stop`, `timeout`) and SIGHUP
//! (a closed terminal). Exit codes are 128 + the signal, as shells report a death by signal.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

#[cfg(unix)]
const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, signal_hook::consts::SIGHUP];
#[cfg(not(unix))]
const STOP_SIGNALS: [i32; 2] = [SIGINT, SIGTERM];

fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "interrupt",
        SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// A request to stop after the work under way, made by the first stop signal.
pub struct StopRequest {
    requested: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopRequest {
    /// Installs the handlers: the first stop signal sets [`StopRequest::flag`] and prints
    /// "`<signal>: <notice>`"; a second one exits at once.
    pub fn install(notice: &'static str) -> Result<StopRequest> {
        let requested = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicUsize::new(0));
        for s in STOP_SIGNALS {
            // Registered first, so it sees the flag as it was before this signal.
            signal_hook::flag::register_conditional_shutdown(s, 128 + s, Arc::clone(&requested))
                .and_then(|_| signal_hook::flag::register_usize(s, Arc::clone(&signal), s as usize))
                .and_then(|_| signal_hook::flag::register(s, Arc::clone(&requested)))
                .with_context(|| format!("installing the {} handler", name(s)))?;
        }
        print_notices(move |s| {
            eprintln!("\n{}: {notice}", name(s));
            false
        })?;
        Ok(StopRequest { requested, signal })
    }

    /// Set once a stop was requested.
    pub fn flag(&self) -> &AtomicBool {
        &self.requested
    }

    /// The exit code of a run that stopped on request: 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal.load(Ordering::SeqCst) as i32
    }
}

/// For work that is kept as it goes (e.g. `eval --model`, which appends each finished row): the
/// first stop signal prints "`<signal>: <notice>`" and exits at once with 128 + the signal.
pub fn exit_on_stop(notice: &'static str) -> Result<()> {
    print_notices(move |s| {
        eprintln!("\n{}: {notice}", name(s));
        true
    })
}

/// Calls `on_signal` on a thread of its own for each stop signal (printing is not safe in a
/// signal handler), exiting with 128 + the signal when it returns true.
#[cfg(unix)]
fn print_notices(on_signal: impl Fn(i32) -> bool + Send + 'static) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)
        .context("installing the signal handlers")?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            if on_signal(s) {
                // _exit: no destructors racing the thread that is using the device.
                signal_hook::low_level::exit(128 + s);
            }
        }
    });
    Ok(())
}

/// Elsewhere the flag alone does the work (no notice); work kept as it goes keeps the default
/// handling, which ends the process.
#[cfg(not(unix))]
fn print_notices(_on_signal: impl Fn(i32) -> bool + Send + 'static) -> Result<()> {
    Ok(())
}
