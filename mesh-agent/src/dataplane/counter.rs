//! The packet counter programs (`count_xdp`, `count_tc`): a cheap tap on an
//! interface, and the proof that the build, load, attach and map-read path
//! works end to end.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode, tc},
};
use mesh_common::counter::{COUNTER_MAP, CounterSlot, PacketCount};

use super::{DataplaneError, load_object, program_mut};

/// Where to attach the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterAttach {
    /// XDP on the interface's receive path (native mode, falling back to
    /// generic mode where the driver has no native XDP).
    Xdp,
    /// TC clsact ingress.
    TcIngress,
    /// TC clsact egress.
    TcEgress,
}

/// A loaded counter: its own maps, its programs loaded into the kernel.
/// Attachments end when it is dropped.
#[derive(Debug)]
pub struct Counter {
    ebpf: Ebpf,
}

const XDP_PROG: &str = "count_xdp";
const TC_PROG: &str = "count_tc";

impl Counter {
    /// Loads the counter programs (the verifier checks them here).
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = load_object()?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, XDP_PROG)?;
        xdp.load().map_err(|source| DataplaneError::Program { what: format!("loading {XDP_PROG}"), source })?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, TC_PROG)?;
        tc.load().map_err(|source| DataplaneError::Program { what: format!("loading {TC_PROG}"), source })?;
        Ok(Self { ebpf })
    }

    /// Attaches the counter to `ifname` at `at`.
    pub fn attach(&mut self, ifname: &str, at: CounterAttach) -> Result<(), DataplaneError> {
        let what = format!("attaching the counter ({at:?}) to {ifname}");
        match at {
            CounterAttach::Xdp => {
                let prog: &mut Xdp = program_mut(&mut self.ebpf, XDP_PROG)?;
                prog.attach(ifname, XdpMode::Driver)
                    .or_else(|_| prog.attach(ifname, XdpMode::Skb))
                    .map_err(|source| DataplaneError::Program { what, source })?;
            }
            CounterAttach::TcIngress | CounterAttach::TcEgress => {
                // Adding clsact fails if it exists already, which is fine.
                let _ = tc::qdisc_add_clsact(ifname);
                let direction =
                    if at == CounterAttach::TcIngress { TcAttachType::Ingress } else { TcAttachType::Egress };
                let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, TC_PROG)?;
                prog.attach(ifname, direction).map_err(|source| DataplaneError::Program { what, source })?;
            }
        }
        tracing::info!(ifname, attach = ?at, "counter attached");
        Ok(())
    }

    /// Totals per slot, summed over CPUs, in [`CounterSlot::ALL`] order.
    pub fn totals(&self) -> Result<[PacketCount; CounterSlot::COUNT as usize], DataplaneError> {
        let map = self.ebpf.map(COUNTER_MAP).ok_or(DataplaneError::MissingMap(COUNTER_MAP))?;
        let array = PerCpuArray::<_, PacketCount>::try_from(map)
            .map_err(|source| DataplaneError::Map { what: format!("opening {COUNTER_MAP}"), source })?;
        let mut totals = [PacketCount::default(); CounterSlot::COUNT as usize];
        for slot in CounterSlot::ALL {
            let per_cpu = array
                .get(&(slot as u32), 0)
                .map_err(|source| DataplaneError::Map { what: format!("reading {COUNTER_MAP}[{slot:?}]"), source })?;
            totals[slot as usize] = per_cpu.iter().fold(PacketCount::default(), |acc, c| acc.saturating_add(*c));
        }
        Ok(totals)
    }

    /// Runs `count_xdp` once on `frame` through BPF_PROG_TEST_RUN and returns
    /// its XDP verdict. The run is counted like a real packet.
    pub fn test_run_xdp(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        let prog: &Xdp = self
            .ebpf
            .program(XDP_PROG)
            .ok_or(DataplaneError::MissingProgram(XDP_PROG))?
            .try_into()
            .map_err(|source| DataplaneError::Program { what: format!("{XDP_PROG} type"), source })?;
        let opts = TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() };
        let result = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program { what: format!("test-running {XDP_PROG}"), source })?;
        Ok(result.return_value)
    }
}
