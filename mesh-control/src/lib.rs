//! mesh-control: the control plane and orchestration API.
