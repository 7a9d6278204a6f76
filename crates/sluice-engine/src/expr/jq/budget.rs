//! The cooperative interrupt: a per-evaluation budget that jq code checks at every recursion
//! step and every `range` element.
//!
//! jaq has no interrupt, but it lets the embedder supply the global data of a run (`DataT`) and
//! native functions. Sluice gives each run a [`Budget`] and calls the native `__sluice_tick` at the
//! start of every recursive definition (user `def`s and recursive standard definitions such as
//! `repeat`, `recurse`, `while`, `until`) and on each `range` element. A tick fails once the
//! deadline has passed or the native stack has grown past a safe depth, which unwinds the whole
//! evaluation with an error, so a runaway program stops instead of spinning or overflowing the
//! stack (a stack overflow would abort the process).

use std::cell::Cell;
use std::time::{Duration, Instant};

use jaq_core::box_iter::box_once;
use jaq_core::data::HasLut;
use jaq_core::native::{Fun, v};
use jaq_core::{Cv, DataT, Error, Exn, Lut, Native, ValXs};
use jaq_json::Val;

/// The name of the tick native; not meant to be called by users (harmless if it is).
pub(super) const TICK: &str = "__sluice_tick";

/// Stack a run may use before its ticks fail. Blocking-pool threads have 2 MiB by default; half of
/// that leaves room for the native code that runs between two ticks.
const MAX_STACK: usize = 1024 * 1024;

/// How often (in ticks) the clock is read: reading it costs more than the rest of a tick.
const CLOCK_EVERY: u32 = 64;

/// Marker type selecting Sluice's run-time data for jaq.
pub(super) struct Sluice;

impl DataT for Sluice {
    type V<'a> = Val;
    type Data<'a> = RunData<'a>;
}

/// What every native function of one run can see: the program and the run's budget.
#[derive(Clone)]
pub(super) struct RunData<'a> {
    pub lut: &'a Lut<Sluice>,
    pub budget: &'a Budget,
}

impl<'a> HasLut<'a, Sluice> for RunData<'a> {
    fn lut(&self) -> &'a Lut<Sluice> {
        self.lut
    }
}

/// Why a run was stopped by its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Time,
    Stack,
}

/// The limits of one run. Interior mutability only: a run is single-threaded.
pub(super) struct Budget {
    deadline: Option<Instant>,
    stack_base: usize,
    ticks: Cell<u32>,
    stopped: Cell<Option<Stop>>,
}

impl Budget {
    /// No limit: for programs classified as bounded, which contain no ticks worth checking.
    pub fn unlimited() -> Self {
        Budget {
            deadline: None,
            stack_base: 0,
            ticks: Cell::new(0),
            stopped: Cell::new(None),
        }
    }

    /// A budget of `time` from now; `stack_base` is the address of a local of the evaluating frame.
    pub fn new(time: Duration, stack_base: usize) -> Self {
        Budget {
            deadline: Instant::now().checked_add(time),
            stack_base,
            ticks: Cell::new(0),
            stopped: Cell::new(None),
        }
    }

    /// Why the run was stopped, if it was; stays set even if the program caught the error.
    pub fn stopped(&self) -> Option<Stop> {
        self.stopped.get()
    }

    /// One unit of work; fails once the run is out of time or stack.
    pub fn tick(&self) -> Result<(), Error<Val>> {
        if let Some(stop) = self.stopped.get() {
            return Err(stop_error(stop));
        }
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let marker = 0u8;
        let here = std::hint::black_box(&marker) as *const u8 as usize;
        if here.abs_diff(self.stack_base) > MAX_STACK {
            return Err(self.stop(Stop::Stack));
        }
        let n = self.ticks.get().wrapping_add(1);
        self.ticks.set(n);
        if n.is_multiple_of(CLOCK_EVERY) && Instant::now() >= deadline {
            return Err(self.stop(Stop::Time));
        }
        Ok(())
    }

    fn stop(&self, stop: Stop) -> Error<Val> {
        self.stopped.set(Some(stop));
        stop_error(stop)
    }
}

fn stop_error(stop: Stop) -> Error<Val> {
    Error::str(match stop {
        Stop::Time => "expression exceeded its time limit",
        Stop::Stack => "expression recursed too deeply",
    })
}

fn tick(cv: &Cv<'_, Sluice>) -> Result<(), Exn<'static, Val>> {
    cv.0.data().budget.tick().map_err(Exn::from)
}

/// The tick native: the identity filter that fails when the budget is spent. It supports paths and
/// updates so that `path(f)` and `f |= g` work on definitions that contain a tick.
pub(super) fn tick_fun() -> Fun<Sluice> {
    let native = Native::<Sluice>::new(|cv| match tick(&cv) {
        Ok(()) => box_once(Ok(cv.1)),
        Err(e) => box_once(Err(e)),
    })
    .with_paths(|cv| match cv.0.data().budget.tick() {
        Ok(()) => box_once(Ok(cv.1)),
        Err(e) => box_once(Err(Exn::from(e))),
    })
    .with_update(|cv, f| match cv.0.data().budget.tick() {
        Ok(()) => f(cv.1),
        Err(e) => box_once(Err(Exn::from(e))),
    });
    (TICK, v(0), native)
}

/// `range($from; $to; $by)` with a tick per element (replaces jaq's native `range/3`, which the
/// one- and two-argument forms call).
pub(super) fn range_fun() -> Fun<Sluice> {
    ("range", v(3), Native::<Sluice>::new(range_run))
}

fn range_run<'a>(mut cv: Cv<'a, Sluice>) -> ValXs<'a, <Sluice as DataT>::V<'a>> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let by = cv.0.pop_var();
    let to = cv.0.pop_var();
    let from = cv.0.pop_var();
    let budget = cv.0.data().budget;
    let direction = by.partial_cmp(&Val::from(0isize)).unwrap_or(Equal);
    let mut next = Some(from);
    Box::new(std::iter::from_fn(move || {
        let x = next.take()?;
        let more = match direction {
            Greater => x < to,
            Less => x > to,
            Equal => x != to,
        };
        if !more {
            return None;
        }
        if let Err(e) = budget.tick() {
            return Some(Err(Exn::from(e)));
        }
        match x.clone() + by.clone() {
            Ok(following) => next = Some(following),
            Err(e) => return Some(Err(Exn::from(e))),
        }
        Some(Ok(x))
    }))
}
