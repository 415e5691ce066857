//! SPIFFE IDs (`spiffe://trust-domain/path`), parsed and validated per the SPIFFE ID specification.
