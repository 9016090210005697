//! featurestream: a streaming feature pipeline engine.
//!
//! The data path reads top to bottom: [`config`] (pipeline files), [`decode`] (typed events),
//! [`engine`] (windows, aggregates, watermarks, state; synchronous and deterministic), [`io`]
//! (files), [`output`] (record shapes) and [`replay`] (the offline runner).

pub mod config;
pub mod connectors;
pub mod decode;
pub mod demo;
pub mod engine;
pub mod io;
pub mod output;
pub mod replay;
pub mod runtime;
pub mod sample;
pub mod serve;
pub mod telemetry;
