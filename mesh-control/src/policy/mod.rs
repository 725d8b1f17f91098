//! The ACL policy: HuJSON text ([`hujson`]), its typed and validated form
//! ([`model`]) and its compilation into each node's rules ([`compile`]).

pub mod compile;
pub mod hujson;
pub mod model;

#[cfg(test)]
mod tests;

pub use compile::{
    Inventory, InventoryNode, accepts, auto_approved, compile, compile_for_dataplane, connectivity, diff, rule_text,
    run_tests,
};
pub use model::{DEFAULT_POLICY, Policy, Problem, ProblemKind, Target};

/// Parses `text` and runs its tests against `inv`: the whole check a
/// candidate policy must pass before it becomes active. Returns the policy
/// and how many test checks passed.
pub fn check(text: &str, inv: &Inventory) -> Result<(Policy, u32), Vec<Problem>> {
    let policy = Policy::parse(text)?;
    let passed = run_tests(&policy, inv)?;
    Ok((policy, passed))
}

/// Compiles `policy` for every node of `inv` that has `limits` (reported by
/// its agent) and returns one problem per node whose rules would not fit its
/// data path, naming the node and the limit. Such a policy would leave that
/// agent unable to apply its view, so it is refused before it is set.
#[must_use]
pub fn check_limits(
    policy: &Policy,
    inv: &Inventory,
    generation: u64,
    limits: &std::collections::HashMap<u64, mesh_policy::tables::Limits>,
) -> Vec<Problem> {
    if limits.is_empty() {
        return Vec::new();
    }
    compile_for_dataplane(policy, inv, generation)
        .iter()
        .filter_map(|(id, rules)| {
            let l = limits.get(id)?;
            let e = mesh_policy::tables::compile_within(rules, l).err()?;
            let name = inv.iter().find(|n| n.id == *id).map_or("?", |n| n.name.as_str());
            Some(Problem { line: 0, kind: ProblemKind::Limit(format!("node {name} (id {id}): {e}")) })
        })
        .collect()
}
