//! The secret that admits a rank to a job's TCP mesh, and the proofs of it the mesh handshake
//! exchanges.
//!
//! The coordinator draws a fresh secret for every attempt and hands it to each rank with its
//! task (over mutual TLS on a farm with certificates). In the handshake both sides send a nonce
//! and each proves it holds the secret with an HMAC-SHA256 over the hello and both nonces,
//! under a label per side, so a proof can be neither replayed from an earlier handshake nor
//! reflected back. A process that does not hold the secret (anyone who can reach a mesh port)
//! learns nothing of it and is refused before it can take a rank; before, the first connection
//! to claim a rank took it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a mesh secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 16;
/// Bytes of a proof (an HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;

/// Which side of a handshake a proof is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The rank that dials (the higher rank).
    Dialer,
    /// The rank that accepts.
    Acceptor,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Dialer => b"longtake mesh v2 dialer",
            Side::Acceptor => b"longtake mesh v2 acceptor",
        }
    }
}

/// A job attempt's mesh secret.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshSecret([u8; SECRET_BYTES]);

impl std::fmt::Debug for MeshSecret {
    /// Never the bytes: a secret must not reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshSecret(..)")
    }
}

/// A secret of the wrong length (the task's `mesh_secret` field).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a mesh secret is {SECRET_BYTES} bytes, this one {0}")]
pub struct SecretLength(pub usize);

impl MeshSecret {
    pub fn new(bytes: [u8; SECRET_BYTES]) -> Self {
        Self(bytes)
    }

    /// A fresh secret from the operating system's random source.
    pub fn random() -> Self {
        Self(random_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, SecretLength> {
        <[u8; SECRET_BYTES]>::try_from(bytes)
            .map(Self)
            .map_err(|_| SecretLength(bytes.len()))
    }

    /// `side`'s proof of holding this secret, bound to the handshake's `hello` and nonces.
    pub fn proof(
        &self,
        side: Side,
        hello: &[u8],
        dialer_nonce: &[u8; NONCE_BYTES],
        acceptor_nonce: &[u8; NONCE_BYTES],
    ) -> [u8; PROOF_BYTES] {
        self.mac(side, hello, dialer_nonce, acceptor_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is `side`'s proof for this handshake (compared in constant time).
    pub fn verify(
        &self,
        side: Side,
        hello: &[u8],
        dialer_nonce: &[u8; NONCE_BYTES],
        acceptor_nonce: &[u8; NONCE_BYTES],
        proof: &[u8],
    ) -> bool {
        self.mac(side, hello, dialer_nonce, acceptor_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    fn mac(
        &self,
        side: Side,
        hello: &[u8],
        dialer_nonce: &[u8; NONCE_BYTES],
        acceptor_nonce: &[u8; NONCE_BYTES],
    ) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(side.label());
        mac.update(hello);
        mac.update(dialer_nonce);
        mac.update(acceptor_nonce);
        mac
    }
}

/// A fresh handshake nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    random_bytes()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without an OS random source nothing about the farm can be secret: fail loudly.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_secret_side_hello_and_nonces() {
        let secret = MeshSecret::random();
        let (hello, d, a) = (b"hello".as_slice(), nonce(), nonce());
        let proof = secret.proof(Side::Dialer, hello, &d, &a);
        assert!(secret.verify(Side::Dialer, hello, &d, &a, &proof));
        assert!(
            !secret.verify(Side::Acceptor, hello, &d, &a, &proof),
            "reflected"
        );
        assert!(!secret.verify(Side::Dialer, b"hellp", &d, &a, &proof));
        assert!(!secret.verify(Side::Dialer, hello, &a, &d, &proof));
        assert!(
            !secret.verify(Side::Dialer, hello, &d, &nonce(), &proof),
            "replayed"
        );
        let other = MeshSecret::random();
        assert_ne!(other, secret);
        assert!(!other.verify(Side::Dialer, hello, &d, &a, &proof));
        assert!(!secret.verify(Side::Dialer, hello, &d, &a, &proof[..31]));
    }

    #[test]
    fn a_secret_has_its_length_and_never_prints() {
        assert_eq!(MeshSecret::from_slice(&[1; 31]), Err(SecretLength(31)));
        let secret = MeshSecret::from_slice(&[0xAB; SECRET_BYTES]).unwrap();
        assert_eq!(format!("{secret:?}"), "MeshSecret(..)");
    }
}
