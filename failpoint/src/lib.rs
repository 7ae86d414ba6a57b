//! Fail points between durable steps, in the TiKV/sled style: a test makes the process die at
//! exactly one step, restarts it, and checks that nothing was lost or left behind.
//!
//! Code marks a step that lies between two durable writes with [`hit`]:
//!
//! ```
//! failpoint::hit("catalog::create::backend-made");
//! ```
//!
//! Built without the `failpoints` feature (every release and benchmark build), [`hit`] is an empty
//! inline function: no cost. With it, a process that called [`setup`] reads the `FAILPOINTS`
//! environment variable of the `fail` crate (`NAME=ACTIONS;...`), and a fail point whose action
//! triggers `return` kills its own process with SIGKILL, at once: no destructor, no flush, no
//! unwinding that a runtime could catch, exactly as a crash there would. `2*off->return` dies at
//! the third time the point is reached; the other actions of `fail` (`sleep`, `pause`, `print`)
//! work as that crate says. Before dying, the process writes `fail point NAME: dying here` on
//! stderr, so a test can tell that it died at that step and not elsewhere.

/// What a process holds while its fail points are configured (see [`setup`]).
pub struct Scenario {
    #[cfg(feature = "failpoints")]
    _fail: fail::FailScenario<'static>,
}

/// Configures the fail points named in `FAILPOINTS`; they stay configured while the returned
/// value lives. Without the `failpoints` feature it does nothing.
pub fn setup() -> Scenario {
    Scenario {
        #[cfg(feature = "failpoints")]
        _fail: fail::FailScenario::setup(),
    }
}

/// Whether fail points are compiled in.
pub const fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// A step between two durable writes: the process dies here if the fail point `name` is set to
/// `return`.
#[inline(always)]
pub fn hit(name: &'static str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        die(name);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// The text a dying process writes on stderr at fail point `name`.
pub fn dying_message(name: &str) -> String {
    format!("fail point {name}: dying here")
}

#[cfg(feature = "failpoints")]
fn die(name: &str) -> ! {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{}", dying_message(name));
    loop {
        // SAFETY: kill(2) of our own process; SIGKILL cannot be caught, so it does not return
        // to code that could observe anything half done.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
