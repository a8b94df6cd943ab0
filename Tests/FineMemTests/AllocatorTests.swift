import Testing
@testable import FineMem

private func cluster(memoryNodes: Int = 1, poolMiB: UInt64 = 64, computeNodes: Int = 1) async throws -> EmbeddedCluster {
    try await EmbeddedCluster.start(.init(memoryNodes: memoryNodes, poolBytesPerNode: poolMiB << 20, computeNodes: computeNodes))
}

@Suite struct AllocatorBasics {
    @Test func allocateWriteReadFree() async throws {
        let c = try await cluster()
        let allocator = c.makeAllocator()
        let buffer = try await allocator.allocate(bytes: 10_000)
        #expect(buffer.length == 16_384)
        try await allocator.write(Array("hello, remote memory".utf8), to: buffer, at: 100)
        #expect(try await allocator.read(buffer, offset: 100, length: 20) == Array("hello, remote memory".utf8))
        try await allocator.free(buffer)
        await c.quiesce()
        let inspector = PoolInspector(memoryNodes: c.memoryNodes)
        #expect(inspector.checkAtRest() == [])
        #expect(inspector.everyHeaderEmpty() == [])
    }

    @Test func everySizeFrom4KiBTo1GiB() async throws {
        let c = try await cluster(poolMiB: 4096)
        let allocator = c.makeAllocator()
        let inspector = PoolInspector(memoryNodes: c.memoryNodes)
        var buffers: [RemoteBuffer] = []
        for k in 0...18 {
            let buffer = try await allocator.allocate(bytes: 4096 << k)
            #expect(buffer.length == 4096 << k)
            let block = try allocator.block(for: buffer)
            #expect(block.sizeLog2 == k && block.firstChunk % block.chunkCount == 0)
            #expect(inspector.admit(block, owner: c.computeNodes[0].owner) == [])
            try await allocator.write([UInt8(k)], to: buffer, at: buffer.length - 1)
            buffers.append(buffer)
        }
        await c.quiesce()
        #expect(inspector.checkAtRest() == [])
        for (k, buffer) in buffers.enumerated() {
            #expect(try await allocator.read(buffer, offset: buffer.length - 1, length: 1) == [UInt8(k)])
            #expect(inspector.release(try allocator.block(for: buffer)) == [])
            try await allocator.free(buffer)
        }
        await c.quiesce()
        #expect(inspector.checkAtRest() == [])
        #expect(inspector.everyHeaderEmpty() == [])
    }

    @Test func oddSizesRoundUp() {
        #expect(Block.sizeLog2(forBytes: 1) == 0)
        #expect(Block.sizeLog2(forBytes: 4096) == 0)
        #expect(Block.sizeLog2(forBytes: 4097) == 1)
        #expect(Block.sizeLog2(forBytes: 3 << 20) == 10)
        #expect(Block.sizeLog2(forBytes: 1 << 30) == 18)
    }

    @Test func badRequestsAreTypedErrors() async throws {
        let c = try await cluster(poolMiB: 16)
        let allocator = c.makeAllocator()
        await #expect(throws: AllocationError.zeroSize) { _ = try await allocator.allocate(bytes: 0) }
        await #expect(throws: AllocationError.zeroSize) { _ = try await allocator.allocate(bytes: -5) }
        await #expect(throws: AllocationError.sizeTooLarge(requestedBytes: 32 << 20, maximumBytes: 16 << 20)) {
            _ = try await allocator.allocate(bytes: 32 << 20)
        }
        let whole = try await allocator.allocate(bytes: 16 << 20)
        await #expect(throws: AllocationError.outOfMemory(requestedBytes: 4096)) { _ = try await allocator.allocate(bytes: 1) }
        let buffer = whole
        await #expect(throws: AllocationError.outOfBounds(offset: buffer.length - 2, length: 4, bufferLength: buffer.length)) {
            try await allocator.write([1, 2, 3, 4], to: buffer, at: buffer.length - 2)
        }
        try await allocator.free(whole)
        _ = try await allocator.allocate(bytes: 1)
    }

    @Test func badFreesAreTypedErrorsAndChangeNothing() async throws {
        let c = try await cluster(computeNodes: 2)
        let mine = c.makeAllocator(computeNode: 0, application: ApplicationID(1))
        let sibling = c.makeAllocator(computeNode: 0, application: ApplicationID(2))
        let stranger = c.makeAllocator(computeNode: 1, application: ApplicationID(1))
        let buffer = try await mine.allocate(bytes: 8192)
        let block = try mine.block(for: buffer)
        await c.quiesce()
        let inspector = PoolInspector(memoryNodes: c.memoryNodes)
        _ = inspector.admit(block, owner: c.computeNodes[0].owner)
        await #expect(throws: AllocationError.notOwner(block)) { try await sibling.free(buffer) }
        await #expect(throws: AllocationError.notOwner(block)) { try await stranger.free(buffer) }
        let inside = RemoteBuffer(memoryNode: buffer.memoryNode, address: buffer.address + 4096, length: 4096, rkey: buffer.rkey)
        await #expect(throws: AllocationError.notABlockStart(memoryNode: buffer.memoryNode, address: inside.address)) { try await mine.free(inside) }
        let misaligned = RemoteBuffer(memoryNode: buffer.memoryNode, address: buffer.address + 100, length: 8192, rkey: buffer.rkey)
        await #expect(throws: AllocationError.notABlockStart(memoryNode: buffer.memoryNode, address: misaligned.address)) { try await mine.free(misaligned) }
        let elsewhere = RemoteBuffer(memoryNode: NodeID(9), address: buffer.address, length: 8192, rkey: buffer.rkey)
        await #expect(throws: AllocationError.unknownMemoryNode(NodeID(9))) { try await mine.free(elsewhere) }
        await c.quiesce()
        #expect(inspector.checkAtRest() == [], "failed frees must change nothing")
        try await mine.free(buffer)
        await #expect(throws: AllocationError.doubleFree(block)) { try await mine.free(buffer) }
        await c.quiesce()
        _ = inspector.release(block)
        #expect(inspector.checkAtRest() == [])
        #expect(inspector.everyHeaderEmpty() == [])
        #expect(c.statistics.failedFrees == 4, "sibling, stranger, inside and the double free reach the allocator")
    }

    @Test func spreadsRoundRobinAcrossMemoryNodes() async throws {
        let c = try await cluster(memoryNodes: 3, poolMiB: 8)
        let allocator = c.makeAllocator()
        var nodes: [NodeID] = []
        for _ in 0..<6 { nodes.append(try await allocator.allocate(bytes: 4096).memoryNode) }
        #expect(nodes == [0, 1, 2, 0, 1, 2].map { NodeID($0) })
    }
}

/// Fill a pool completely with one size, free everything, and find every header empty.
@Suite struct FillAndDrain {
    private func fillAndDrain(bytes: Int, memoryNodes: Int, poolMiB: UInt64) async throws {
        let c = try await cluster(memoryNodes: memoryNodes, poolMiB: poolMiB)
        let allocator = c.makeAllocator()
        let inspector = PoolInspector(memoryNodes: c.memoryNodes)
        let expected = Int(poolMiB << 20) / bytes * memoryNodes
        var buffers: [RemoteBuffer] = []
        while true {
            do {
                let buffer = try await allocator.allocate(bytes: bytes)
                buffers.append(buffer)
                let problems = inspector.admit(try allocator.block(for: buffer), owner: c.computeNodes[0].owner)
                if !problems.isEmpty { Issue.record("\(problems)"); return }
            } catch {
                #expect(error == .outOfMemory(requestedBytes: UInt64(bytes)))
                break
            }
        }
        #expect(buffers.count == expected, "the pool must fill completely")
        await c.quiesce()
        #expect(inspector.checkAtRest() == [])
        for buffer in buffers {
            _ = inspector.release(try allocator.block(for: buffer))
            try await allocator.free(buffer)
        }
        await c.quiesce()
        #expect(inspector.checkAtRest() == [])
        #expect(inspector.everyHeaderEmpty() == [])
    }

    @Test(arguments: [1, 3]) func fourKiBBlocks(memoryNodes: Int) async throws {
        try await fillAndDrain(bytes: 4096, memoryNodes: memoryNodes, poolMiB: 16)
    }

    @Test(arguments: [1, 3]) func twoMiBBlocks(memoryNodes: Int) async throws {
        try await fillAndDrain(bytes: 2 << 20, memoryNodes: memoryNodes, poolMiB: 64)
    }

    @Test(arguments: [1, 3]) func sixtyFourMiBBlocks(memoryNodes: Int) async throws {
        try await fillAndDrain(bytes: 64 << 20, memoryNodes: memoryNodes, poolMiB: 256)
    }
}

@Suite struct ReadmeExample {
    /// The README's usage example, as written there.
    @Test func usageExampleWorks() async throws {
        let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 2, poolBytesPerNode: 1 << 30, computeNodes: 1))
        let allocator = cluster.makeAllocator(computeNode: 0, application: ApplicationID(1))

        let buffer = try await allocator.allocate(bytes: 10_000)
        try await allocator.write(Array("hello, remote memory".utf8), to: buffer)
        let bytes = try await allocator.read(buffer, offset: 0, length: 20)
        try await allocator.free(buffer)

        #expect(buffer.length == 16_384)
        #expect(bytes == Array("hello, remote memory".utf8))
    }
}

@Suite struct StartUpErrors {
    @Test func noMemoryNodeIsATypedError() async {
        await #expect(throws: AllocationError.noMemoryNodes) {
            _ = try await BlockAllocator<SimulatedConnection>.start(owner: OwnerID(1), memoryNodes: [], runtime: SystemRuntime.shared)
        }
    }

    @Test func aTakenNodeSlotIsATypedError() async throws {
        let memoryNode = try await MemoryNode.format(id: NodeID(0), geometry: PoolGeometry(sectionCount: 2))
        _ = try await BlockAllocator.start(owner: OwnerID(3), memoryNodes: [try memoryNode.attach(computeNode: OwnerID(3))], runtime: SystemRuntime.shared)
        await #expect(throws: AllocationError.nodeSlotTaken(OwnerID(3), memoryNode: NodeID(0))) {
            _ = try await BlockAllocator.start(owner: OwnerID(3), memoryNodes: [try memoryNode.attach(computeNode: OwnerID(3))], runtime: SystemRuntime.shared)
        }
    }

    @Test func aGrantThatDisagreesWithTheSuperblockIsATypedError() async throws {
        let memoryNode = try await MemoryNode.format(id: NodeID(0), geometry: PoolGeometry(sectionCount: 2))
        let (grant, connection) = try memoryNode.attach(computeNode: OwnerID(1))
        let forged = MemoryNodeGrant(
            memoryNode: grant.memoryNode, geometry: try PoolGeometry(sectionCount: 1), baseAddress: grant.baseAddress,
            metadataKey: grant.metadataKey, dataKey: grant.dataKey)
        await #expect(throws: AllocationError.self) {
            _ = try await BlockAllocator.start(owner: OwnerID(1), memoryNodes: [(forged, connection)], runtime: SystemRuntime.shared)
        }
    }

    @Test func attachingBeyondTheNodeTableIsATypedError() async throws {
        let memoryNode = try await MemoryNode.format(id: NodeID(0), geometry: PoolGeometry(sectionCount: 1, computeNodeSlots: 4))
        #expect(throws: MemoryNodeError.computeNodeSlotOutOfRange(OwnerID(4))) { _ = try memoryNode.attach(computeNode: OwnerID(4)) }
    }
}
