//! The executor service: the actor that registers an executor with the scheduler and runs the
//! steps it is sent ([`actor`]), on the backend `--device` picks ([`crate::backends`]).

pub mod actor;

pub use actor::ExecutorService;
