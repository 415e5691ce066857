//! Istio subset keys carried in SNI: `outbound_.<port>_.<subset>_.<host>`.
