//! The executor service: the actor that registers an executor with the scheduler and runs the
//! steps it is sent ([`actor`]), on the backend `--device` picks ([`device_args`]): the CPU
//! executor, a CUDA GPU ([`cuda_device`]) or the simulated GPU ([`sim_executor`]).

pub mod actor;
pub mod cuda_device;
pub mod device_args;
pub mod sim_executor;

pub use actor::{ExecutorService, StepBackend};
