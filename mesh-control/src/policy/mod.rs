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
