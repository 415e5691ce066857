//! `strait ca init` and `strait cert issue`: a mesh CA and SVIDs in Istio's file layouts.
