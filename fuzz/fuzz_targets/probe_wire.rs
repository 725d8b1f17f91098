//! The probe datagram decoder: every agent decodes whatever arrives on its
//! probe port. Decoding must never panic, and what decodes must re-encode
//! to a fixed point (what an agent relays is what it understood).
#![no_main]

use mesh_agent_formats::probe_wire::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::decode(data) else { return };
    let once = m.encode();
    let again = Message::decode(&once).expect("an encoded message decodes");
    assert_eq!(again.encode(), once, "encoding is not a fixed point for {m:?}");
});
