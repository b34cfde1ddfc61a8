"""Records of the domain table: domain info for the toolstack and the domain and
vCPU state that migrates."""

from __future__ import annotations

from shared.codec import message


@message(229)
class DomainInfo:
    """What ``domsplit list`` shows about one domain."""

    domid: int
    personality: str
    nr_pages: int
    nr_vcpus: int
    online_vcpus: int
    paused: bool
    shutdown_reason: int | None
    privileged: bool
    features: int  #: XENVER_get_features submap 0 as the guest sees it


@message(254)
class VcpuState:
    vcpu: int
    online: bool
    vcpu_info_gfn: int | None  #: where VCPUOP_register_vcpu_info put it
    vcpu_info_offset: int


@message(255)
class DomainState:
    domid: int
    nr_pages: int
    personality: str
    feature_mask: int
    vcpus: tuple[VcpuState, ...]
    hvm_params: dict[int, int]
    shared_info_gfn: int | None
    incarnation: int
