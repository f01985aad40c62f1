"""Accelerators and links: peak numbers from the vendors' spec sheets (each entry says which).

Only *peak* numbers live here. What a real program reaches of them (the efficiency factors) is
fitted on published measurements (:mod:`distgen.planner.fit`), never typed in.

Conventions: ``flops`` is dense (no structured sparsity) bf16/fp16 tensor-core throughput with
fp32 accumulation (what PyTorch uses), FLOP/s; ``mem_bw`` is bytes/s; ``mem_gb`` the device
memory in GB (1e9 bytes). A link's ``bw`` is what one rank can push in one direction, bytes/s
(vendors quote NVLink and PCIe as bidirectional totals: halved here).
"""

from __future__ import annotations

from dataclasses import dataclass

from distgen.config import ConfigError

TB, GB, T = 1e12, 1e9, 1e12


@dataclass(frozen=True)
class Accelerator:
    name: str
    flops: float  # dense bf16/fp16 tensor FLOP/s (fp32 for the cpu entry)
    mem_bw: float  # bytes/s
    mem_gb: float
    nvlink: str | None  # the NVLink generation of the SXM / bridged part, None without NVLink
    pcie: str  # the host link
    source: str
    bytes_per_param: int = 2  # the dtype the planner assumes (bf16 on GPUs, fp32 on the cpu)


# fmt: off
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity -> 989.4 dense;
    # 3.35 TB/s HBM3; 80 GB; NVLink 900 GB/s; PCIe Gen5.
    Accelerator("h100", 989.4 * T, 3.35 * TB, 80, "nvlink4", "pcie5", "NVIDIA H100 datasheet, SXM5 column"),
    # Same datasheet, PCIe column: 1,513 TFLOPS sparse -> 756 dense; 2.0 TB/s; NVLink bridge 600 GB/s.
    Accelerator("h100-pcie", 756.0 * T, 2.0 * TB, 80, "nvlink-bridge4", "pcie5", "NVIDIA H100 datasheet, PCIe column"),
    # NVIDIA H200 datasheet (SXM): same Hopper compute as H100 SXM, 4.8 TB/s HBM3e, 141 GB, NVLink 900 GB/s.
    Accelerator("h200", 989.4 * T, 4.8 * TB, 141, "nvlink4", "pcie5", "NVIDIA H200 datasheet, SXM column"),
    # H800 SXM (China export part): H100 SXM compute and memory, NVLink cut to 400 GB/s (DeepEP's README
    # quotes ~160 GB/s reached of it).
    Accelerator("h800", 989.4 * T, 3.35 * TB, 80, "nvlink-h800", "pcie5", "NVIDIA H800 SXM product brief"),
    # NVIDIA A100 datasheet: BF16 312 TFLOPS dense; 80 GB SXM 2,039 GB/s, 40 GB 1,555 GB/s, 80 GB PCIe
    # 1,935 GB/s; NVLink 600 GB/s (SXM); PCIe Gen4.
    Accelerator("a100-80gb", 312 * T, 2.039 * TB, 80, "nvlink3", "pcie4", "NVIDIA A100 datasheet, 80GB SXM column"),
    Accelerator("a100-40gb", 312 * T, 1.555 * TB, 40, "nvlink3", "pcie4", "NVIDIA A100 datasheet, 40GB SXM column"),
    Accelerator("a100-80gb-pcie", 312 * T, 1.935 * TB, 80, "nvlink-bridge3", "pcie4",
                "NVIDIA A100 datasheet, 80GB PCIe column"),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 sparse), 864 GB/s GDDR6, 48 GB, PCIe Gen4, no NVLink.
    Accelerator("l40s", 362.05 * T, 864 * GB, 48, None, "pcie4", "NVIDIA L40S datasheet"),
    # NVIDIA L40 datasheet: BF16 181.05 TFLOPS dense (362.1 sparse), 864 GB/s, 48 GB, PCIe Gen4.
    Accelerator("l40", 181.05 * T, 864 * GB, 48, None, "pcie4", "NVIDIA L40 datasheet"),
    # NVIDIA L20 product brief: FP16/BF16 tensor 119.5 TFLOPS dense (239 sparse), 864 GB/s, 48 GB, PCIe Gen4.
    Accelerator("l20", 119.5 * T, 864 * GB, 48, None, "pcie4", "NVIDIA L20 product brief"),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: FP16 tensor with FP32 accumulate 165.2 TFLOPS dense;
    # 1,008 GB/s GDDR6X; 24 GB; PCIe Gen4; no NVLink.
    Accelerator("rtx4090", 165.2 * T, 1.008 * TB, 24, None, "pcie4", "NVIDIA Ada whitepaper, RTX 4090"),
    # NVIDIA T4 datasheet: mixed-precision FP16/FP32 65 TFLOPS, 320 GB/s, 16 GB, 70 W, PCIe Gen3.
    Accelerator("t4", 65 * T, 320 * GB, 16, None, "pcie3", "NVIDIA T4 datasheet"),
    # Parts that appear in the published measurements only:
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS tensor, 900 GB/s, 32 GB, NVLink 300 GB/s.
    Accelerator("v100", 125 * T, 900 * GB, 32, "nvlink2", "pcie3", "NVIDIA V100 datasheet, SXM2 column"),
    # NVIDIA A30 datasheet: BF16 165 TFLOPS dense, 933 GB/s, 24 GB, PCIe Gen4 (NVLink bridge 200 GB/s).
    Accelerator("a30", 165 * T, 933 * GB, 24, None, "pcie4", "NVIDIA A30 datasheet"),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16 tensor with FP32 accumulate 71 TFLOPS dense, 936 GB/s, 24 GB.
    Accelerator("rtx3090", 71 * T, 936 * GB, 24, None, "pcie4", "NVIDIA GA102 whitepaper, RTX 3090"),
    # NVIDIA RTX 6000 Ada datasheet: 1,457 TFLOPS FP8 sparse -> 364 FP16 dense; 960 GB/s; 48 GB.
    Accelerator("rtx6000-ada", 364.2 * T, 960 * GB, 48, None, "pcie4", "NVIDIA RTX 6000 Ada datasheet"),
    # NVIDIA RTX A5000 datasheet: tensor 222.2 TFLOPS sparse -> 111.1 dense; 768 GB/s; 24 GB.
    Accelerator("rtx-a5000", 111.1 * T, 768 * GB, 24, None, "pcie4", "NVIDIA RTX A5000 datasheet"),
    # This project's machine, one core per rank (distgen runs fp32 on CPU): AMD EPYC Zen 3 (lscpu: family 25,
    # 2.45 GHz), two 256-bit FMA pipes = 32 fp32 FLOP/cycle -> 78 GFLOP/s per core (AMD Zen 3 software
    # optimisation guide); memory: ~35 GB/s one core streams through a GEMV, measured (ALGORITHMS.md §10);
    # 23 GB of host memory shared by the ranks (free -g).
    Accelerator("cpu", 78.4e9, 35 * GB, 23, None, "shm", "AMD Zen 3 guide x 2.45 GHz; ALGORITHMS.md §10 (measured)",
                bytes_per_param=4),
)}
ALIASES = {
    "a100": "a100-80gb", "a100-sxm": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb",
    "h100-sxm": "h100", "h100-80gb": "h100", "4090": "rtx4090", "rtx-4090": "rtx4090", "l40-48gb": "l40",
    "l20-48gb": "l20", "t4-16gb": "t4",
}


@dataclass(frozen=True)
class Link:
    name: str
    bw: float  # bytes/s one rank pushes in one direction
    kind: str  # nvlink | pcie | host | network | loopback: the class whose efficiency factors are fitted
    source: str


LINKS: dict[str, Link] = {link.name: link for link in (
    # NVLink: per-GPU totals from the datasheets, bidirectional, halved.
    Link("nvlink2", 150 * GB, "nvlink", "V100 datasheet: NVLink 300 GB/s"),
    Link("nvlink3", 300 * GB, "nvlink", "A100 datasheet: NVLink 600 GB/s (12 links x 50 GB/s)"),
    Link("nvlink4", 450 * GB, "nvlink", "H100 datasheet: NVLink 900 GB/s (18 links x 50 GB/s)"),
    Link("nvlink-h800", 200 * GB, "nvlink", "H800 product brief: NVLink 400 GB/s"),
    Link("nvlink-bridge3", 300 * GB, "nvlink", "A100 PCIe datasheet: NVLink bridge 600 GB/s (pairs only)"),
    Link("nvlink-bridge4", 300 * GB, "nvlink", "H100 PCIe datasheet: NVLink bridge 600 GB/s (pairs only)"),
    # PCIe x16: PCI-SIG line rates (8 / 16 / 32 GT/s, 128b/130b): 15.75 / 31.5 / 63 GB/s per direction.
    Link("pcie3", 15.75 * GB, "pcie", "PCI-SIG: PCIe 3.0 x16, 8 GT/s"),
    Link("pcie4", 31.5 * GB, "pcie", "PCI-SIG: PCIe 4.0 x16, 16 GT/s"),
    Link("pcie5", 63 * GB, "pcie", "PCI-SIG: PCIe 5.0 x16, 32 GT/s"),
    # NCCL_P2P_DISABLE=1 on NVLink machines: NCCL's SHM transport copies through host memory; each byte crosses
    # the sender's and the receiver's own PCIe 5 link once, so a rank still pushes up to the line rate.
    Link("pcie5-host", 63 * GB, "host", "PCIe 5.0 x16 line rate, through host memory (NCCL SHM transport)"),
    # Networks, one NIC per GPU: InfiniBand NDR 400 Gb/s, HDR 200 Gb/s (NVIDIA ConnectX-7 / -6 product briefs);
    # Ethernet by line rate.
    Link("ib-ndr", 50 * GB, "network", "NVIDIA ConnectX-7: InfiniBand NDR 400 Gb/s per port"),
    Link("ib-hdr", 25 * GB, "network", "NVIDIA ConnectX-6: InfiniBand HDR 200 Gb/s per port"),
    Link("ethernet-100g", 12.5 * GB, "network", "100 Gb/s Ethernet line rate"),
    Link("ethernet-25g", 3.125 * GB, "network", "25 Gb/s Ethernet line rate"),
    # One host, CPU ranks: gloo over TCP loopback, measured ~0.75 GB/s at 16 MiB (ALGORITHMS.md §10);
    # distgen's shared-memory transport: bounded by one core's copy bandwidth (~35 GB/s, ALGORITHMS.md §10).
    Link("gloo", 0.75 * GB, "loopback", "measured on this machine (ALGORITHMS.md §10)"),
    Link("shm", 35 * GB, "shm", "one core's memory bandwidth, measured (ALGORITHMS.md §10)"),
)}
# PCIe servers hold their GPUs under two CPU sockets, this many each (the usual 8-GPU PCIe box): an all-to-all over
# more ranks crosses the inter-socket link with every pair at once (an assumption, stated in the README).
PCIE_GPUS_PER_SOCKET = 4
# What --interconnect accepts besides the names above: a family resolved against the accelerator.
LINK_FAMILIES = ("nvlink", "pcie")
LINK_ALIASES = {"ib": "ib-ndr", "infiniband": "ib-ndr", "ndr": "ib-ndr", "hdr": "ib-hdr", "ethernet": "ethernet-100g",
                "roce": "ib-ndr", "rdma": "ib-ndr", "nvlink-p2p-disabled": "pcie5-host"}
# fmt: on


def accelerator(name: str, option: str = "--hardware") -> Accelerator:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ACCELERATORS:
        raise ConfigError(f"{option} {name}: unknown hardware; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


def link(name: str, hardware: Accelerator, option: str = "--interconnect") -> Link:
    """A link by name, or ``nvlink`` / ``pcie`` resolved to the accelerator's own generation."""
    key = name.strip().lower()
    key = LINK_ALIASES.get(key, key)
    if key == "nvlink":
        if hardware.nvlink is None:
            raise ConfigError(f"{option} nvlink: {hardware.name} has no NVLink; use pcie (its {hardware.pcie}) or one of: "
                              f"{', '.join(LINKS)}")
        key = hardware.nvlink
    elif key == "pcie":
        key = hardware.pcie
    if key not in LINKS:
        raise ConfigError(f"{option} {name}: unknown interconnect; known: {', '.join(LINK_FAMILIES + tuple(LINKS))}")
    return LINKS[key]
