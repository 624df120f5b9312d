//! evod's wire formats: everything both ends of a channel must agree on.
//!
//! - [`protocol`]: what the ring's bytes mean between the supervisor or the
//!   evolver and a worker (opcodes [`op`], reply [`status`] codes, payload
//!   codecs), and [`exchange`] / [`receive_id`], the one loop that sends a
//!   request and waits for the reply carrying its id.
//! - [`control`]: the control socket's JSON lines ([`Request`],
//!   [`Response`], [`StatusReport`]) and the client [`call`].
//! - [`standby`]: the bytes of a warm standby's link.
//! - [`notice`]: the crash notice a dying worker writes on its link.
//! - [`fault`]: fault kinds (`segv`, `exit:N`, …) as fault opcodes.
//! - [`rest`]: the resting evolver's marker `state/converged`, which the
//!   supervisor reads for `evod status`.
//!
//! Every decoder here treats its input as untrusted.

#![deny(missing_docs)]

pub mod control;
pub mod fault;
pub mod notice;
pub mod protocol;
pub mod rest;
pub mod standby;

pub use control::{
    ChildStatus, ClientError, EvolverReport, HostStatus, InputError, Request, Response,
    StatusReport, call, check_exec_inputs, parse_exec_inputs,
};
pub use protocol::{
    DecodeError, EvalHeader, ExecHeader, LoadRequest, MAX_BATCH, RECIPE_BYTES, RecipesHeader,
    WorkerInfo, eval_flags, exchange, op, receive_id, status,
};
