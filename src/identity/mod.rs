//! The gateway's identity and the mesh's: `ca` issues a mesh CA and workload SVIDs into
//! Istio's file layouts, and `svid` keeps the gateway's own SVID fresh from the mesh CA.

pub mod ca;
pub mod svid;
