import Testing
@testable import FineMem
import FineMemHarness

// DESIGN.md invariant 7: out of memory is answered only when the pool had no room for the
// request at some instant during the call, as a read made during the call shows (issue
// "Soundness at the edges", defects 3 and 4). Each test is one interleaving written out in
// virtual time with a fixed seed, printed in every expectation.

@Suite struct OutOfMemoryRuleTests {
    /// Regression test for defect 3. A's first task (asking for the whole pool) leads a
    /// full refresh whose READs execute (no 4 MiB run free) and whose answer is still on
    /// its way back; B frees its 4 MiB run and quiesces; A's second task starts, joins the
    /// refresh in flight and, before, answered out of memory on its words although the
    /// run was free for its whole call. With `leaderFails`, the leader's refresh fails
    /// instead, and the joiner returned as if it had read. Now the joined read is at most
    /// the first of the two reads no room rests on, the second begun after it ended, and a
    /// failed read is no answer: the second task gets the run.
    @Test(arguments: [false, true])
    func aRefreshBegunBeforeTheCallIsNotItsAnswer(leaderFails: Bool) throws {
        let seed: UInt64 = 191
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 8 << 20, computeNodes: 1), simulator: simulator)
            let b = cluster.computeNodes[0]
            let grant = cluster.memoryNodes[0].loopbackGrant
            let armed = Locked(false)
            let gateOpen = Locked(false)
            // The first full read after `armed` is held: failed once the gate opens (the
            // leader fails), or executed and its answer held until then.
            @Sendable func holds(_ verbs: [Verb]) -> Bool {
                isFullRead(verbs, grant: grant) && armed.withLock { armed in defer { armed = false }; return armed }
            }
            @Sendable func waitForGate() async {
                while !gateOpen.withLock({ $0 }) { await simulator.sleep(nanoseconds: 1_000) }
            }
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, failsWhen: { verbs in
                    guard leaderFails, holds(verbs) else { return false }
                    await waitForGate()
                    return true
                }, after: { verbs in
                    guard !leaderFails, holds(verbs) else { return }
                    await waitForGate()
                })
            }
            let inspector = PoolInspector(cluster: cluster)
            let runs = [try await a.allocate(chunkCountLog2: 10, application: ApplicationID(1)),
                        try await b.allocate(chunkCountLog2: 10, application: ApplicationID(1))]
            for (run, node) in zip(runs, [a, b]) { _ = inspector.admit(run, owner: node.owner) }
            await cluster.quiesce()
            await a.quiesce()
            armed.withLock { $0 = true }
            let first = Locked<String?>(nil)
            simulator.spawn {
                // 8 MiB, the whole pool: never there while A holds a run.
                do { _ = try await a.allocate(chunkCountLog2: 11, application: ApplicationID(1)) } catch { first.withLock { $0 = "\(error)" } }
            }
            guard await waitUntil(simulator, { !armed.withLock { $0 } }) else { return ["set-up: the first task never read"] }
            try await b.free(runs[1], application: ApplicationID(1))
            _ = inspector.release(runs[1])
            await b.quiesce()
            let second = Locked<Result<Block, AllocationError>?>(nil)
            simulator.spawn {
                do throws(AllocationError) {
                    let block = try await a.allocate(chunkCountLog2: 10, application: ApplicationID(2))
                    second.withLock { $0 = .success(block) }
                } catch {
                    second.withLock { $0 = .failure(error) }
                }
            }
            await simulator.sleep(nanoseconds: 200_000)
            gateOpen.withLock { $0 = true }
            guard await waitUntil(simulator, { second.withLock { $0 != nil } }) else {
                return ["the second task never answered"]
            }
            await a.quiesce()
            switch second.withLock({ $0 })! {
            case .success(let block): return inspector.admit(block, owner: a.owner)
            case .failure(let error):
                return ["the second task answered \(error) although a 4 MiB run was free for its whole call (the first answered \(first.withLock { $0 } ?? "a block"))"]
            }
        }
        #expect(problems(of: result) == [], "seed \(seed), leader fails: \(leaderFails)")
    }

    /// Regression test for defect 4, on the 4 KiB path and for a run of sections. A
    /// makes its full read (one free place P), and stalls before its claim; meanwhile B
    /// frees another place Q and then takes P: room existed at every instant. A's claim
    /// loses; before, the cache then showed no room and A answered out of memory at once
    /// because it had made its full read. Now no room rests on two equal full reads: the
    /// second differs, and A takes Q.
    @Test(arguments: [0, 10])
    func aLostRaceAfterTheFullReadIsNotOutOfMemory(chunkCountLog2: Int) throws {
        let seed: UInt64 = 192
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let poolBytes: UInt64 = chunkCountLog2 == 0 ? 2 << 20 : 8 << 20
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: poolBytes, computeNodes: 1), simulator: simulator)
            // B takes the top free run when it has a choice (`runSpread`): P, not Q.
            let bOwner = (20...).lazy.map { OwnerID(UInt16($0)) }.first {
                BlockAllocator.runSpread(owner: $0, application: ApplicationID(1), retries: 0) % UInt64(runChoicesMax) == 0
            }!
            let b = try await startGatedNode(cluster, owner: bOwner, id: NodeID(1901))
            let grant = cluster.memoryNodes[0].loopbackGrant
            let inspector = PoolInspector(cluster: cluster)
            let application = ApplicationID(1)
            let armed = Locked(false)
            let fullReads = Locked(0)
            let target = Locked<RemoteAddress?>(nil)
            let bMoves = Locked<(() async -> [String])?>(nil)
            let found = Locked<[String]>([])
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, failsWhen: { verbs in
                    guard armed.withLock({ $0 }) else { return false }
                    if isFullRead(verbs, grant: grant) { fullReads.withLock { $0 += 1 } }
                    guard fullReads.withLock({ $0 }) > 0, let address = target.withLock({ $0 }), casOn(address, in: verbs),
                          let moves = bMoves.withLock({ moves in defer { moves = nil }; return moves }) else { return false }
                    let problems = await moves()
                    found.withLock { $0 += problems }
                    return false
                })
            }
            // Fill the pool with B's blocks of the size asked for, then free P.
            var held: [Block] = []
            while let block = try? await b.allocate(chunkCountLog2: chunkCountLog2, application: application) { held.append(block) }
            for block in held { _ = inspector.admit(block, owner: b.owner) }
            guard held.count >= 2 else { return ["set-up: B holds \(held.count) blocks"] }
            // A learns that the pool is full (its cache then holds a full read's words).
            if let block = try? await a.allocate(chunkCountLog2: chunkCountLog2, application: application) { return ["set-up: A got \(block) from a full pool"] }
            // P: the 8th block (chunk 7), or the top run (runs are taken from the top).
            let p = chunkCountLog2 == 0 ? held.first { $0.firstChunk == 7 }! : held.max { $0.firstChunk < $1.firstChunk }!
            let q = chunkCountLog2 == 0 ? held.first { $0.firstChunk == 163 }! : held.min { $0.firstChunk < $1.firstChunk }!
            try await b.free(p, application: application)
            _ = inspector.release(p)
            await b.quiesce()
            target.withLock { $0 = grant.address(of: HeaderSlot(committing: p)) }
            armed.withLock { $0 = true }
            let bTook = Locked<Block?>(nil)
            bMoves.withLock {
                $0 = {
                    do throws(AllocationError) {
                        try await b.free(q, application: application)
                        await b.quiesce()
                        let taken = try await b.allocate(chunkCountLog2: chunkCountLog2, application: application)
                        await b.quiesce()
                        bTook.withLock { $0 = taken }
                        return taken == p ? [] : ["set-up: B took \(taken), not P \(p)"]
                    } catch {
                        return ["B: \(error)"]
                    }
                }
            }
            var problems: [String] = []
            do {
                let block = try await a.allocate(chunkCountLog2: chunkCountLog2, application: application)
                _ = inspector.release(q)
                if let taken = bTook.withLock({ $0 }) { problems += inspector.admit(taken, owner: b.owner) }
                problems += inspector.admit(block, owner: a.owner)
                if block != q { problems.append("A got \(block), not Q \(q)") }
            } catch {
                problems.append("A answered \(error) although P or Q was free at every instant of its call")
            }
            if bTook.withLock({ $0 }) == nil { problems.append("set-up: A's claim on P never came after its full read") }
            return found.withLock { $0 } + problems
        }
        #expect(problems(of: result) == [], "seed \(seed), 2^\(chunkCountLog2) chunks")
    }

    /// Out of memory on a pool that is full rests on two full reads that show it held
    /// throughout: A answers `outOfMemory`, having made exactly two full reads.
    @Test func aFullPoolIsOutOfMemoryAfterTwoReads() throws {
        let seed: UInt64 = 193
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let b = cluster.computeNodes[0]
            let grant = cluster.memoryNodes[0].loopbackGrant
            let fullReads = Locked(0)
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, failsWhen: { verbs in
                    if isFullRead(verbs, grant: grant) { fullReads.withLock { $0 += 1 } }
                    return false
                })
            }
            _ = try await b.allocate(chunkCountLog2: 9, application: ApplicationID(1))
            await b.quiesce()
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 0, application: ApplicationID(1))
                return ["A got \(block) from a full pool"]
            } catch {
                guard case .outOfMemory = error else { return ["A answered \(error)"] }
            }
            let reads = fullReads.withLock { $0 }
            return reads == 2 ? [] : ["A answered out of memory after \(reads) full reads"]
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// `MemoryNodeLink.refresh` shares a read in flight, and the next refresh is a read
    /// of its own, begun after the shared one ended. Task 1's full read executes (4 MiB
    /// run R held by B) and its answer is held back; B frees R; task 2 asks for a refresh
    /// while task 1's is in flight and takes its words (R held); its next refresh reads
    /// again and sees R free. (No room rests on two such reads.)
    @Test func theRefreshAfterASharedOneReadsAgain() throws {
        let seed: UInt64 = 194
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 8 << 20, computeNodes: 1), simulator: simulator)
            let b = cluster.computeNodes[0]
            let grant = cluster.memoryNodes[0].loopbackGrant
            let armed = Locked(false)
            let gateOpen = Locked(false)
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, after: { verbs in
                    guard isFullRead(verbs, grant: grant), armed.withLock({ armed in defer { armed = false }; return armed }) else { return }
                    while !gateOpen.withLock({ $0 }) { await simulator.sleep(nanoseconds: 1_000) }
                })
            }
            _ = try await a.allocate(chunkCountLog2: 10, application: ApplicationID(1))
            let run = try await b.allocate(chunkCountLog2: 10, application: ApplicationID(1))
            await cluster.quiesce()
            await a.quiesce()
            let link = a.links[0]
            armed.withLock { $0 = true }
            let reads = Locked<[Int: [Result<FullRead, FabricError>]]>([:])
            @Sendable func refresh(_ task: Int, times: Int) async {
                var trace = OperationTrace()
                for _ in 0..<times {
                    do throws(FabricError) {
                        let read = try await link.refresh(trace: &trace, runtime: simulator, pauseNanos: 500...128_000)
                        reads.withLock { $0[task, default: []].append(.success(read)) }
                    } catch {
                        reads.withLock { $0[task, default: []].append(.failure(error)) }
                    }
                }
            }
            simulator.spawn { await refresh(1, times: 1) }
            guard await waitUntil(simulator, { !armed.withLock { $0 } }) else { return ["set-up: task 1 never read"] }
            try await b.free(run, application: ApplicationID(1))
            await b.quiesce()
            simulator.spawn { await refresh(2, times: 2) }
            await simulator.sleep(nanoseconds: 100_000)
            gateOpen.withLock { $0 = true }
            guard await waitUntil(simulator, { reads.withLock { $0[1]?.count == 1 && $0[2]?.count == 2 } }) else { return ["the refreshes never answered"] }
            let answers = reads.withLock { $0 }
            guard case .success(let shared) = answers[2]![0], case .success(let own) = answers[2]![1] else { return ["task 2: \(answers[2]!)"] }
            var found: [String] = []
            if shared.hasRoom(chunkCountLog2: 10) { found.append("set-up: task 2 did not share task 1's read") }
            if !own.hasRoom(chunkCountLog2: 10) { found.append("task 2's next refresh answered the shared read's words again: no 4 MiB run") }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// A shared refresh that failed is no answer. Task 1's full read is held and then
    /// fails; tasks 2 and 3 joined it meanwhile. The leader answers the failure; the
    /// joiners must read themselves (one leads, the other joins it) and answer real words.
    @Test func aFailedSharedRefreshIsNoAnswer() throws {
        let seed: UInt64 = 195
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 8 << 20, computeNodes: 1), simulator: simulator)
            let grant = cluster.memoryNodes[0].loopbackGrant
            let fullReads = Locked(0)
            let gateOpen = Locked(false)
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, failsWhen: { verbs in
                    guard isFullRead(verbs, grant: grant) else { return false }
                    let number = fullReads.withLock { reads -> Int in
                        reads += 1
                        return reads
                    }
                    guard number == 1 else { return false }
                    while !gateOpen.withLock({ $0 }) { await simulator.sleep(nanoseconds: 1_000) }
                    return true
                })
            }
            let link = a.links[0]
            let reads = Locked<[Int: Result<FullRead, FabricError>]>([:])
            @Sendable func refresh(_ task: Int) async {
                var trace = OperationTrace()
                do throws(FabricError) {
                    let read = try await link.refresh(trace: &trace, runtime: simulator, pauseNanos: 500...128_000)
                    reads.withLock { $0[task] = .success(read) }
                } catch {
                    reads.withLock { $0[task] = .failure(error) }
                }
            }
            simulator.spawn { await refresh(1) }
            guard await waitUntil(simulator, { fullReads.withLock { $0 } == 1 }) else { return ["set-up: task 1 never read"] }
            simulator.spawn { await refresh(2) }
            simulator.spawn { await refresh(3) }
            await simulator.sleep(nanoseconds: 10_000)
            gateOpen.withLock { $0 = true }
            guard await waitUntil(simulator, { reads.withLock { $0.count == 3 } }) else { return ["the refreshes never answered"] }
            let answers = reads.withLock { $0 }
            var found: [String] = []
            if case .success = answers[1]! { found.append("set-up: the leader's read did not fail") }
            for task in [2, 3] {
                switch answers[task]! {
                case .success(let read):
                    if read.sections.count != grant.geometry.sectionCount || read.spans.count != grant.geometry.spanCount {
                        found.append("task \(task), a joiner of a failed refresh, answered \(read.sections.count) section words")
                    }
                case .failure(let error): found.append("task \(task), a joiner of a failed refresh, answered its failure: \(error)")
                }
            }
            let count = fullReads.withLock { $0 }
            if count != 2 { found.append("\(count) full reads, not the failed one and one more shared by the joiners") }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
