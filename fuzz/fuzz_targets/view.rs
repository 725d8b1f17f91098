//! What an agent does with control's messages on the wire: decode a
//! `NodeView` and a `NodeViewDelta` from arbitrary bytes (prost), convert
//! the view's compiled policy into mesh-policy's form (which is then
//! validated, as the agent does before installing it), and apply the delta
//! to the view. Errors are fine; panics are not.
#![no_main]

use mesh_proto::v1 as pb;
use prost::Message as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // One input carries both: a length-delimited view, then a delta.
    let mut rest = data;
    let Ok(mut view) = pb::NodeView::decode_length_delimited(&mut rest) else { return };
    if let Some(p) = &view.policy
        && let Ok(policy) = mesh_client::policy::from_proto(p)
    {
        let _ = policy.validate();
    }
    let Ok(delta) = pb::NodeViewDelta::decode(rest) else { return };
    if mesh_client::view::apply(&mut view, &delta).is_ok()
        && let Some(p) = &view.policy
    {
        let _ = mesh_client::policy::from_proto(p);
    }
});
