//! Palisade's identity core: SPIFFE IDs, the CA that issues X509-SVIDs, CSRs, SVID verification,
//! trust bundles, the rustls configs and verifiers of mesh mTLS, and the credentials store that
//! lets a renewed certificate take over without touching open connections.
//!
//! Everything that decides "who is this peer" lives here, so the proxy and the control plane
//! share one implementation of the SPIFFE rules.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod duration;
#[doc(hidden)]
pub mod fuzzing;
pub mod kx;
pub mod pem;
pub mod secure_fs;
pub mod spiffe;
pub mod store;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::TrustBundle;
pub use ca::{Ca, CaError, ServingCert};
pub use csr::KeyAndCsr;
pub use duration::{DurationError, parse_duration};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{CredentialStore, Credentials, SharedBundle};
pub use svid::Svid;
pub use verify::{SvidError, verify_svid};
