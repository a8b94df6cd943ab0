#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Testing
@testable import FineMem
import FineMemHarness

/// A NIC with a 1 MiB pool, one region over the first 64 KiB, and a connection.
private struct Bench {
    let nic: SimulatedNIC
    let pd: ProtectionDomain
    let region: MemoryRegion
    let connection: SimulatedConnection

    init(access: RemoteAccess = .all) throws {
        (nic, pd, region) = try makeTarget(regionBytes: 64 << 10, access: access)
        connection = nic.connect(from: NodeID(1), protectionDomain: pd)
    }
}

private func expectViolation(
    _ expected: RemoteAccessViolation, on connection: SimulatedConnection, _ verbs: [Verb],
    sourceLocation: SourceLocation = #_sourceLocation
) async {
    do throws(FabricError) {
        _ = try await connection.post(verbs)
        Issue.record("expected \(expected), the batch succeeded", sourceLocation: sourceLocation)
    } catch {
        guard case .remoteAccess(let violation, _, _, _) = error else {
            Issue.record("expected \(expected), got \(error)", sourceLocation: sourceLocation)
            return
        }
        #expect(violation == expected, sourceLocation: sourceLocation)
    }
    #expect(connection.isBroken, "the connection must be broken after a remote access error", sourceLocation: sourceLocation)
    do throws(FabricError) {
        _ = try await connection.post([.read(connection.nic.baseAddress, length: 8, rkey: verbs[0].rkey)])
        Issue.record("a broken connection executed a verb", sourceLocation: sourceLocation)
    } catch {
        #expect(error == .connectionBroken(NodeID(0)), sourceLocation: sourceLocation)
    }
}

@Suite struct SimulatedNICTests {
    @Test func readWriteCompareAndSwapFetchAndAdd() async throws {
        let b = try Bench()
        let a = b.region.address
        try await b.connection.write(a + 16, bytes: [1, 2, 3, 4, 5], rkey: b.region.rkey)
        #expect(try await b.connection.read(a + 16, length: 5, rkey: b.region.rkey) == [1, 2, 3, 4, 5])
        let first = try await b.connection.compareAndSwap(a + 64, expected: 0, desired: 7, rkey: b.region.rkey)
        #expect(first.exchanged && first.original == 0)
        let second = try await b.connection.compareAndSwap(a + 64, expected: 0, desired: 9, rkey: b.region.rkey)
        #expect(!second.exchanged && second.original == 7)
        #expect(try await b.connection.fetchAndAdd(a + 64, delta: 5, rkey: b.region.rkey) == 7)
        #expect(b.nic.peekWord(a + 64) == 12)
        let c = b.connection.counters
        #expect(c.batches == 5 && c[.compareAndSwap] == 2 && c[.fetchAndAdd] == 1 && c.bytesWritten == 5 && c.bytesRead == 5)
    }

    @Test func batchExecutesInOrderAndReturnsAllResults() async throws {
        let b = try Bench()
        let a = b.region.address + 128
        let results = try await b.connection.post([
            .writeWord(a, 5, rkey: b.region.rkey),
            .compareAndSwap(a, expected: 5, desired: 6, rkey: b.region.rkey),
            .fetchAndAdd(a, delta: 10, rkey: b.region.rkey),
            .readWords(a, count: 1, rkey: b.region.rkey),
        ])
        #expect(results[1].compareAndSwap == (true, 5))
        #expect(results[2] == .fetchAndAdd(original: 6))
        #expect(results[3].words == [16])
        #expect(b.connection.counters.batches == 1)
    }

    @Test func unknownKey() async throws {
        let b = try Bench()
        await expectViolation(.unknownKey, on: b.connection, [.read(b.region.address, length: 8, rkey: RKey(index: 999, tag: 0))])
    }

    @Test func keyOfAnotherProtectionDomainIsUnknown() async throws {
        let b = try Bench()
        let other = b.nic.connect(from: NodeID(2), protectionDomain: b.nic.allocateProtectionDomain())
        await expectViolation(.unknownKey, on: other, [.read(b.region.address, length: 8, rkey: b.region.rkey)])
    }

    @Test func outOfBounds() async throws {
        let b = try Bench()
        await expectViolation(.outOfBounds, on: b.connection, [.read(b.region.address + ((64 << 10) - 4), length: 8, rkey: b.region.rkey)])
    }

    @Test func noPermission() async throws {
        let b = try Bench(access: .read)
        await expectViolation(.permissionDenied(needed: .write), on: b.connection, [.writeWord(b.region.address, 1, rkey: b.region.rkey)])
        let c = try Bench(access: [.read, .write])
        await expectViolation(.permissionDenied(needed: .atomic), on: c.connection, [.fetchAndAdd(c.region.address, delta: 1, rkey: c.region.rkey)])
    }

    @Test func misalignedAtomic() async throws {
        let b = try Bench()
        await expectViolation(.misalignedAtomic, on: b.connection, [.compareAndSwap(b.region.address + 4, expected: 0, desired: 1, rkey: b.region.rkey)])
    }

    @Test func invalidatedWindow() async throws {
        let b = try Bench()
        let window = try b.nic.allocateWindow(pd: b.pd)
        let key = try b.nic.bind(window, in: b.region, address: b.region.address + 4096, length: 4096, access: .all)
        _ = try await b.connection.read(b.region.address + 4096, length: 4096, rkey: key)
        await expectViolation(.outOfBounds, on: b.connection, [.read(b.region.address, length: 8, rkey: key)])
        let fresh = b.nic.connect(from: NodeID(1), protectionDomain: b.pd)
        try b.nic.invalidate(window)
        await expectViolation(.windowInvalidated, on: fresh, [.read(b.region.address + 4096, length: 8, rkey: key)])
    }

    /// A connection checks a key it used a moment ago without the key table's lock (its
    /// key cache), and still sees every change at once: an invalidation, a rebind, on the
    /// word-batch path and the general one.
    @Test func keysAConnectionUsedAreCheckedAfreshAfterEveryChange() async throws {
        let b = try Bench()
        let window = try b.nic.allocateWindow(pd: b.pd)
        let first = try b.nic.bind(window, in: b.region, address: b.region.address + 4096, length: 4096, access: .all)
        var batch = WordBatch()
        _ = batch.read(b.region.address + 4096, rkey: first)
        _ = batch.read(b.region.address, rkey: b.region.rkey)
        try await b.connection.post(&batch)
        let second = try b.nic.bind(window, in: b.region, address: b.region.address + 8192, length: 4096, access: .all)
        await expectViolation(.staleKey, on: b.connection, [.read(b.region.address + 4096, length: 8, rkey: first)])
        let other = b.nic.connect(from: NodeID(1), protectionDomain: b.pd)
        _ = try await other.read(b.region.address + 8192, length: 8, rkey: second)
        try b.nic.invalidate(window)
        var after = WordBatch()
        _ = after.read(b.region.address + 8192, rkey: second)
        do throws(FabricError) {
            try await other.post(&after)
            Issue.record("a word batch used a key after its window was invalidated")
        } catch {
            guard case .remoteAccess(.windowInvalidated, _, _, _) = error else {
                Issue.record("expected windowInvalidated, got \(error)")
                return
            }
        }
    }

    @Test func keyOfWindowAfterRebindIsStale() async throws {
        let b = try Bench()
        let window = try b.nic.allocateWindow(pd: b.pd)
        let old = try b.nic.bind(window, in: b.region, address: b.region.address, length: 4096, access: .all)
        let new = try b.nic.bind(window, in: b.region, address: b.region.address, length: 4096, access: .all)
        #expect(new == old.incremented)
        _ = try await b.connection.read(b.region.address, length: 8, rkey: new)
        await expectViolation(.staleKey, on: b.connection, [.read(b.region.address, length: 8, rkey: old)])
    }

    @Test func tagWrapsAfter256Binds() throws {
        let b = try Bench()
        let window = try b.nic.allocateWindow(pd: b.pd)
        var keys: [RKey] = []
        for _ in 0..<257 { keys.append(try b.nic.bind(window, in: b.region, address: b.region.address, length: 64, access: .read)) }
        #expect(keys[0] == keys[256], "the 8-bit tag wraps: this is why capabilities must not rely on it alone")
        #expect(Set(keys[0..<256]).count == 256)
    }

    @Test func deregisteredRegionFencesItsKey() async throws {
        let b = try Bench()
        _ = try await b.connection.read(b.region.address, length: 8, rkey: b.region.rkey)
        try b.nic.deregister(b.region)
        await expectViolation(.unknownKey, on: b.connection, [.read(b.region.address, length: 8, rkey: b.region.rkey)])
    }

    @Test func errorInsideBatchStopsTheRest() async throws {
        let b = try Bench()
        let a = b.region.address
        do throws(FabricError) {
            _ = try await b.connection.post([
                .writeWord(a, 1, rkey: b.region.rkey),
                .writeWord(a + (1 << 20), 2, rkey: b.region.rkey),
                .writeWord(a + 8, 3, rkey: b.region.rkey),
            ])
            Issue.record("batch with a bad verb succeeded")
        } catch {
            guard case .remoteAccess(.outOfBounds, _, _, 1) = error else { Issue.record("wrong error \(error)"); return }
        }
        #expect(b.nic.peekWord(a) == 1 && b.nic.peekWord(a + 8) == 0)
    }

    @Test func localCallsRejectBadInput() throws {
        let b = try Bench()
        #expect(throws: NICControlError.rangeOutsidePool(address: b.nic.baseAddress + (2 << 20), length: 8)) {
            _ = try b.nic.registerRegion(pd: b.pd, address: b.nic.baseAddress + (2 << 20), length: 8, access: .all)
        }
        let window = try b.nic.allocateWindow(pd: b.pd)
        #expect(throws: NICControlError.bindOutsideRegion(address: b.region.address, length: 1 << 20)) {
            _ = try b.nic.bind(window, in: b.region, address: b.region.address, length: 1 << 20, access: .read)
        }
        let readOnly = try b.nic.registerRegion(pd: b.pd, address: b.nic.baseAddress, length: 4096, access: .read)
        #expect(throws: NICControlError.bindExceedsRegionAccess) {
            _ = try b.nic.bind(window, in: readOnly, address: readOnly.address, length: 64, access: .all)
        }
        _ = try b.nic.bind(window, in: b.region, address: b.region.address, length: 64, access: .read)
        #expect(throws: NICControlError.regionHasBoundWindows(b.region.rkey)) { try b.nic.deregister(b.region) }
    }

    /// A 64 GiB pool is reserved, not committed: mapping it and touching one word of each
    /// of 16 far-apart pages raises this process's resident memory by far less than a
    /// MiB per page touched.
    @Test func largePoolCostsNothingUntilTouched() throws {
        func residentBytes() -> UInt64 {
            guard let file = fopen("/proc/self/statm", "r") else { return 0 }
            defer { fclose(file) }
            var line = [CChar](repeating: 0, count: 256)
            guard fgets(&line, Int32(line.count), file) != nil else { return 0 }
            let fields = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).split(separator: " ")
            guard fields.count > 1, let resident = UInt64(fields[1]) else { return 0 }
            return resident * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        }
        let before = residentBytes()
        let nic = try SimulatedNIC(node: NodeID(0), poolBytes: 64 << 30)
        let pd = nic.allocateProtectionDomain()
        let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: 64 << 30, access: .all)
        for page in 0..<16 as Range<UInt64> {
            _ = nic.perform(.writeWord(region.address + page * (4 << 30), page, rkey: region.rkey))
        }
        let after = residentBytes()
        #expect(before > 0 && after > 0, "/proc/self/statm must be readable")
        #expect(after < before + 16 << 20, "resident memory grew by \(after - before) bytes for a 64 GiB pool")
        #expect(nic.peekWord(region.address + 15 * (4 << 30)) == 15)
    }
}

/// Immediate mode under real concurrency; run with `swift test --sanitize=thread --filter ImmediateConcurrency`.
@Suite struct ImmediateConcurrencyTests {
    @Test func hammerOneWordWithCompareAndSwapAndFetchAndAdd() async throws {
        let b = try Bench()
        let word = b.region.address + 256
        let workers = 8
        let rounds = 2_000
        let key = b.region.rkey
        let nic = b.nic
        let pd = b.pd
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                group.addTask {
                    // Half the workers share one connection, half have their own.
                    let connection = worker % 2 == 0 ? b.connection : nic.connect(from: NodeID(UInt16(10 + worker)), protectionDomain: pd)
                    var expected: UInt64 = 0
                    await recordingErrors("worker \(worker)") {
                        for _ in 0..<rounds {
                            while true {
                                let answer = try await connection.compareAndSwap(word, expected: expected, desired: expected &+ 1, rkey: key)
                                if answer.exchanged { break }
                                expected = answer.original
                            }
                            expected &+= 1
                            _ = try await connection.fetchAndAdd(word, delta: 1, rkey: key)
                            _ = try await connection.readWords(word, count: 1, rkey: key)
                        }
                    }
                }
            }
        }
        #expect(nic.peekWord(word) == UInt64(workers * rounds * 2))
    }
}

/// Two OS threads, released together behind a barrier, hammer one word of the simulated
/// NIC with compare-and-swap increments and fetch-and-adds, synchronously (no task hops,
/// so the threads truly overlap on two cores); the final value must be exact. A CAS that
/// is not atomic (a load, a compare and a store) loses increments here within a few
/// thousand iterations. CI runs this suite in a step of its own.
@Suite struct ImmediateAtomicityTests {
    @Test func casAndFetchAndAddAreAtomicAcrossThreads() throws {
        let (nic, _, region) = try makeTarget(node: 0)
        let word = region.address + 512
        let iterations = 200_000
        let arrived = Locked(0)
        let exchangedCounts = Locked([Int](repeating: 0, count: 2))
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            arrived.withLock { $0 += 1 }
            while arrived.withLock({ $0 }) < 2 {}
            var exchanged = 0
            var expected: UInt64 = 0
            for _ in 0..<iterations {
                while true {
                    let result = nic.perform(.compareAndSwap(word, expected: expected, desired: expected &+ 1, rkey: region.rkey))
                    let answer = result.compareAndSwap
                    if answer.exchanged { break }
                    expected = answer.original
                }
                exchanged += 1
                expected &+= 1
                _ = nic.perform(.fetchAndAdd(word, delta: 1, rkey: region.rkey))
            }
            exchangedCounts.withLock { $0[thread] = exchanged }
        }
        #expect(exchangedCounts.withLock { $0 } == [iterations, iterations])
        #expect(nic.peekWord(word) == UInt64(4 * iterations), "increments were lost: the NIC's atomics are not atomic")
    }
}

/// The allocator on real threads (immediate mode): 4 compute nodes x 6 tasks, mixed sizes
/// up to 8 MiB. Invariant 1 is checked after every allocation; invariant 3 and the at-rest
/// checks once everything is quiet. Run under `swift test --sanitize=thread`.
@Suite struct ImmediateAllocatorConcurrencyTests {
    @Test func realThreadsMixedSizes() async throws {
        let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 2, poolBytesPerNode: 128 << 20, computeNodes: 4))
        let inspector = Locked(PoolInspector(cluster: cluster))
        let problems = Locked<[String]>([])
        try await withThrowingTaskGroup(of: Void.self) { group in
            for node in 0..<4 {
                for task in 0..<6 {
                    let allocator = try cluster.makeAllocator(computeNode: node, application: ApplicationID(UInt16(task + 1)))
                    let owner = cluster.computeNodes[node].owner
                    /// Takes the buffer out of the ledger and frees it.
                    @Sendable func free(_ buffer: RemoteBuffer) async {
                        do throws(AllocationError) {
                            let block = try allocator.block(for: buffer)
                            let released = inspector.withLock { $0.release(block) }
                            problems.withLock { $0 += released }
                            try await allocator.free(buffer)
                        } catch {
                            problems.withLock { $0.append("free \(buffer): \(error)") }
                        }
                    }
                    group.addTask {
                        var random = SeededRandom(seed: UInt64(node * 6 + task))
                        var held: [RemoteBuffer] = []
                        for _ in 0..<150 {
                            if held.count >= 6 || (!held.isEmpty && random.next() % 3 == 0) {
                                await free(held.remove(at: Int(random.next() % UInt64(held.count))))
                            } else {
                                var chunkCountLog2 = 0
                                while chunkCountLog2 < 11, random.next() % 2 == 0 { chunkCountLog2 += 1 }
                                do throws(AllocationError) {
                                    let buffer = try await allocator.allocate(bytes: 4096 << chunkCountLog2)
                                    let block = try allocator.block(for: buffer)
                                    let found = inspector.withLock { $0.admit(block, owner: owner) }
                                    problems.withLock { $0 += found }
                                    held.append(buffer)
                                } catch {
                                    if case .outOfMemory = error { continue }
                                    problems.withLock { $0.append("allocate 2^\(chunkCountLog2) chunks: \(error)") }
                                }
                            }
                        }
                        for buffer in held { await free(buffer) }
                    }
                }
            }
        }
        await cluster.quiesce()
        #expect(problems.withLock { $0 } == [])
        #expect(inspector.withLock { $0.checkAtRest() } == [])
        #expect(inspector.withLock { $0.everyHeaderEmpty() } == [])
        #expect(cluster.statistics.allocations > 1_000)
    }

    /// READ and WRITE through the caller's memory (no array per transfer in immediate
    /// mode) move the same bytes as the general verbs, aligned or not, count as one-verb
    /// batches, and fail as they do: a key that does not cover the bytes is a typed
    /// remote access error that breaks the connection and changes nothing.
    @Test func transfersThroughCallerMemoryAreCheckedAndCountedAsVerbs() async throws {
        let b = try Bench()
        let a = b.region.address
        let local = UnsafeMutableRawBufferPointer.allocate(byteCount: 24, alignment: 8)
        defer { local.deallocate() }
        for (index, byte) in (0..<24).enumerated() { local[index] = UInt8(byte + 1) }
        try await b.connection.write(a + 64, rkey: b.region.rkey, from: UnsafeRawBufferPointer(local))
        try await b.connection.write(a + 203, rkey: b.region.rkey, from: UnsafeRawBufferPointer(rebasing: local[0..<5]))
        #expect(try await b.connection.read(a + 64, length: 24, rkey: b.region.rkey) == Array(1...24))
        #expect(try await b.connection.read(a + 203, length: 5, rkey: b.region.rkey) == Array(1...5))
        try await b.connection.write(a + 300, bytes: Array(101...111), rkey: b.region.rkey)
        try await b.connection.read(a + 300, rkey: b.region.rkey, into: UnsafeMutableRawBufferPointer(rebasing: local[0..<11]))
        #expect(Array(local[0..<11]) == Array(101...111))
        let c = b.connection.counters
        #expect(c.batches == 6 && c[.write] == 3 && c[.read] == 3 && c.bytesWritten == 40 && c.bytesRead == 40)

        let window = try b.nic.allocateWindow(pd: b.pd)
        let key = try b.nic.bind(window, in: b.region, address: a + 4096, length: 4096, access: .all)
        do throws(FabricError) {
            try await b.connection.write(a + 8184, rkey: key, from: UnsafeRawBufferPointer(local))
            Issue.record("a WRITE past its window's end succeeded")
        } catch {
            #expect(error == .remoteAccess(.outOfBounds, address: a + 8184, rkey: key, verbIndex: 0))
        }
        #expect(b.connection.isBroken && b.nic.peekWord(a + 8184) == 0, "the WRITE past the window changed the pool")
        do throws(FabricError) {
            try await b.connection.read(a + 64, rkey: b.region.rkey, into: local)
            Issue.record("a broken connection executed a READ")
        } catch {
            #expect(error == .connectionBroken(NodeID(0)))
        }
    }
}

