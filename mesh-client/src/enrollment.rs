//! The text form of an enrollment key: `mek1.<id>.<secret>[.<ca-pin>]`.
//!
//! `<ca-pin>` is the hex SHA-256 of control's CA certificate (DER): an agent
//! enrolling with the key trusts exactly that CA (see
//! [`crate::channel::Trust::Pin`]). Control issues keys and checks their
//! secrets; agents parse them to find the pin.

/// A parsed enrollment key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentKeyText {
    /// Key id.
    pub id: String,
    /// The secret.
    pub secret: String,
    /// SHA-256 of the CA certificate to trust, if the key carries it.
    pub ca_pin: Option<[u8; 32]>,
}

impl EnrollmentKeyText {
    /// Parses `mek1.<id>.<secret>[.<ca-pin>]`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        if parts.next()? != "mek1" {
            return None;
        }
        let id = parts.next()?.to_owned();
        let secret = parts.next()?.to_owned();
        let ca_pin = match parts.next() {
            Some(p) => Some(hex::decode(p).ok()?.try_into().ok()?),
            None => None,
        };
        if parts.next().is_some() || id.is_empty() || secret.is_empty() {
            return None;
        }
        Some(Self { id, secret, ca_pin })
    }

    /// The text form.
    #[must_use]
    pub fn to_text(&self) -> String {
        match &self.ca_pin {
            Some(pin) => format!("mek1.{}.{}.{}", self.id, self.secret, hex::encode(pin)),
            None => format!("mek1.{}.{}", self.id, self.secret),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_key_round_trip() {
        let k = EnrollmentKeyText { id: "abc".into(), secret: "c2VjcmV0".into(), ca_pin: Some([7; 32]) };
        assert_eq!(EnrollmentKeyText::parse(&k.to_text()), Some(k.clone()));
        let bare = EnrollmentKeyText { ca_pin: None, ..k };
        assert_eq!(EnrollmentKeyText::parse(&bare.to_text()), Some(bare));
        assert_eq!(EnrollmentKeyText::parse("mek2.a.b"), None);
        assert_eq!(EnrollmentKeyText::parse("mek1.a.b.zz"), None);
        assert_eq!(EnrollmentKeyText::parse("mek1.a"), None);
    }
}
