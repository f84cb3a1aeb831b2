//! `nodeplane-lab`: a Kubernetes node (or a few) and its pods made of network namespaces,
//! with the control plane played from ordinary YAML.
//!
//! ```text
//!   YAML files ──parse──▶ ControlPlane ──cluster()──▶ <state>/manifests/cluster.yaml ──▶ agent
//!                            │ (pure: IPs, ClusterIPs, EndpointSlices)        (--manifests)
//!                            ▼
//!   Lab ── slot N ── np{N}-node ──┬── lxc1a2b3c4d ══ eth0  np{N}-demo-web-0  (serve web-0)
//!                    (routes,     ├── lxc5e6f7a8b ══ eth0  np{N}-demo-web-1  (serve web-1)
//!                     agent)      └── ...
//! ```
//!
//! * [`control_plane`] is pure and unit-tested: what an API server, the scheduler, the
//!   kubelet and the EndpointSlice controller would make of the input objects.
//! * [`Lab`] makes it real: claims a [`slot`] (so concurrent labs never collide), creates
//!   the namespaces and veth pairs ([`netns`]) as a CNI plugin would, starts a
//!   [`server`] in each pod, and writes the manifests the agent reads.
//! * [`naming`] derives every name and address from the slot.
//! * [`topology`] shapes a lab as the single node above or as several nodes on an
//!   underlay, with an external client and an internet; [`underlay`] builds that network
//!   ([`Lab::up_with`]).
//!
//! NetworkPolicies pass through to the manifests untouched (enforcing them is the
//! agent's job); [`Lab::label`] relabels pods and namespaces at runtime, and a pod's
//! `lab.nodeplane.io/answer` annotation sets what its server answers (see [`server`]).
//!
//! Everything needs root except [`control_plane`].
pub mod control_plane;
pub mod files;
pub mod lab;
pub mod naming;
pub mod netns;
pub mod process;
pub mod server;
pub mod slot;
pub mod topology;
pub mod underlay;
pub mod xdp_pass;

pub use control_plane::{ControlPlane, Kind, ObjectKey};
pub use lab::{Lab, LabConfig, LabError, LabNode, read_sources};
pub use naming::HOST_VETH_PREFIX;
pub use topology::Topology;
