"""What upstream's wheel has and ours does not (yet), each with the reason. test_surface_parity.py fails on anything
missing that is not here, and on any entry here that ours now has: the list is exactly what is still open.

Keys: "module:Name" (a whole name: a class excepted this way is not checked member by member),
"module:Class.member", or either with "()" appended to except a signature difference only. Classes that inherit
their members from another (INHERITED) share its member entries.
"""

# Reasons: work that belongs to another issue, or a difference kept on purpose.
TIERS = "needs the disk, DFS and NVMe-oF tiers (issues 16 and 20)"
LEASE_VIEW = (
    "no behaviour to match: upstream 0.3.13.post1 exports the type (one member, `buffer`), but none of its calls "
    "returns or takes one and it cannot be constructed from Python; our leases hand out memoryviews"
)
ENGINE_PTR = (
    "deliberately absent: upstream hands C++ extensions the address of its C++ mooncake::TransferEngine object; "
    "this package has no C++ object of that type, and an address of anything else would crash the extension that "
    "dereferences it (get_engine(), which Python code passes to the store's setup, is present)"
)
ALLOC_FUNCS = (
    "needs GPU memory (issue 15): upstream hands torch's CUDAPluggableAllocator the addresses of C functions that "
    "allocate fabric-shareable CUDA memory; a build without CUDA has no such allocator to point at"
)

EXCEPTIONS = {
    # mooncake.engine
    "mooncake.engine:TransferEngine.get_engine_ptr": ENGINE_PTR,
    # mooncake.store: module level
    "mooncake.store:BufferLeaseView": LEASE_VIEW,
    "mooncake.store:RegisteredBufferLeaseView": LEASE_VIEW,
    "mooncake.store:DiskDescriptor": TIERS,
    "mooncake.store:MooncakeDistributedNoFRegister": TIERS,
    "mooncake.store:get_alloc_func_addr": ALLOC_FUNCS,
    "mooncake.store:get_free_func_addr": ALLOC_FUNCS,
    "mooncake.store:ReplicaDescriptor.get_disk_descriptor": TIERS,
    "mooncake.store:ReplicateConfig.dfs_replica_num": TIERS,
    "mooncake.store:ReplicateConfig.nof_replica_num": TIERS,
    "mooncake.store:ReplicateConfig.preferred_nof_segments": TIERS,
    # mooncake.store: MooncakeDistributedStore methods
    "mooncake.store:MooncakeDistributedStore.unmount_local_disk_segment": TIERS,
    "mooncake.store:MooncakeDistributedStore.get_offload_rpc_read_count": TIERS,
}

# "module:Class" -> the "module:Class" whose member entries apply to it (it inherits them).
INHERITED = {
    "mooncake.async_store:MooncakeDistributedStore": "mooncake.store:MooncakeDistributedStore",
    "mooncake.async_store:MooncakeDistributedStoreAsync": "mooncake.store:MooncakeDistributedStore",
    "mooncake.mooncake_store_service:MooncakeDistributedStore": "mooncake.store:MooncakeDistributedStore",
}
