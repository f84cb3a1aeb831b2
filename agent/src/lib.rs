//! The node agent.
//!
//! ```text
//!  source (files | kube watch)          one task per source, async
//!      │  Batch of Events  (Apply / Delete / Reset per kind)
//!      ▼
//!  index::Index        sync: k8s objects -> validated model types, bad ones skipped + logged
//!      │  &Index
//!      ▼
//!  desired::compute    pure: Services x EndpointSlices -> frontends with sorted backends
//!      │  Desired
//!      ▼
//!  sync::Syncer        pure diff against what was written -> ordered Ops, stable ids
//!      │  &[Op]
//!      ▼
//!  MapWriter           datapath::Maps (aya, the kernel) | sync::FakeMaps (tests)
//! ```
pub mod agent;
pub mod config;
pub mod ctgc;
pub mod datapath;
pub mod desired;
pub mod events;
pub mod external;
pub mod flowlog;
pub mod health;
pub mod healthcheck;
pub mod index;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod occupancy;
pub mod pin;
pub mod policy;
pub mod socklb;
pub mod source;
pub mod sync;
