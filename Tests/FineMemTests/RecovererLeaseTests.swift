import Testing
@testable import FineMem
import FineMemHarness

// One recoverer of a node at a time, and a fence that reaches every incarnation (issue
// "Soundness at the edges", defects 1 and 2). Each test is one interleaving written out in
// virtual time with a fixed seed, printed in every expectation.

private let application = ApplicationID(1)

@Suite struct RecovererLeaseTests {
    /// Regression test for defect 1 (two recoverers at once), the shape in which only
    /// fencing the earlier recoverer helps: a CAS whose expected word is back to what the
    /// stalled recoverer read (ABA), so that "one attempt, from a word read in this run"
    /// does not stop it.
    ///
    /// Interleaving (one 2 MiB section):
    /// 1. X opens span 0: marks it `opening` and flips its section entry to chunk mode,
    ///    then crashes before its claim. X is fenced.
    /// 2. Recoverer R1 (over `recoveryAccess`) reads the pool and decides to return the
    ///    entry to empty (CAS on the section word W, entry in chunk mode), and stalls
    ///    before that doorbell.
    /// 3. The memory node recovers X itself (the lease monitor's path): entry to empty,
    ///    span closed, slot free.
    /// 4. Y opens span 0 and claims chunk 0: the entry flips back to chunk mode, and the
    ///    section word is W again (span state changes keep the section's log).
    /// 5. R1 resumes: without the recoverer lease its CAS finds W and returns the entry of
    ///    Y's open span to empty; Z's 128 KiB claim then takes span 0 over Y's block.
    @Test func aStalledRecovererCannotChangeAWordBackToWhatItRead() throws {
        let seed: UInt64 = 181
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 3), simulator: simulator)
            let (x, y, z) = (cluster.computeNodes[0], cluster.computeNodes[1], cluster.computeNodes[2])
            let inspector = PoolInspector(cluster: cluster)
            let memoryNode = cluster.memoryNodes[0]
            let xNode = EmbeddedCluster.computeNodeID(0)
            simulator.faults.crash(xNode, afterVerbs: simulator.verbsExecuted(by: xNode) + 2, late: .none)
            simulator.spawn { _ = try? await x.allocate(chunkCountLog2: 0, application: application) }
            guard await waitUntil(simulator, { simulator.faults.isCrashed(xNode) }) else { return ["set-up: X did not crash"] }
            let span = inspector.span(on: memoryNode.id, section: 0, span: 0)
            guard span?.mode == .opening, inspector.section(on: memoryNode.id, 0)?.state(ofSpan: 0).isChunkMode == true else {
                return ["set-up: X did not die between its flip and its claim: span \(String(describing: span))"]
            }
            try await cluster.fence(computeNode: 0)
            let sectionWord = memoryNode.loopbackGrant.address(of: .section(0))
            let yBlock = Locked<Block?>(nil)
            let problems = Locked<[String]>([])
            let access = try memoryNode.recoveryAccess(for: x.owner, from: NodeID(900)).interposing { raw in
                PausingConnection(raw) { _, verbs in
                    guard casOn(sectionWord, in: verbs), yBlock.withLock({ $0 }) == nil else { return }
                    do {
                        _ = try await cluster.recover(computeNode: 0)
                        let block = try await y.allocate(chunkCountLog2: 0, application: application)
                        await y.quiesce()
                        yBlock.withLock { $0 = block }
                        problems.withLock { $0 += inspector.admit(block, owner: y.owner) }
                    } catch {
                        problems.withLock { $0.append("while R1 stalls: \(error)") }
                    }
                }
            }
            let stalled: String
            do {
                _ = try await PoolRecovery(access: access, runtime: simulator).run()
                stalled = "finished"
            } catch {
                stalled = "\(error)"
            }
            guard let block = yBlock.withLock({ $0 }) else { return problems.withLock { $0 } + ["R1 never reached the section CAS (\(stalled))"] }
            if block.section != 0 || block.spanInSection != 0 { return ["set-up: Y's block \(block) is not in span 0"] }
            var found = problems.withLock { $0 }
            found += inspector.marked(block).map { "after R1 (\(stalled)): \($0)" }
            if let zBlock = try? await z.allocate(chunkCountLog2: 5, application: application) { found += inspector.admit(zBlock, owner: z.owner) }
            await cluster.quiesce()
            found += inspector.checkAtRest()
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Regression test for defect 1 as the review found it: the stalled recoverer's
    /// reclaim CAS, decided on its old image, loses; a retry applied X's runs from the old
    /// records to the word the lost CAS returned and freed Y's live block in X's name.
    /// (Fencing the earlier recoverer stops the CAS itself; a lost CAS of recovery is no
    /// longer tried again on a word it did not read.)
    @Test func aStalledRecovererCannotFreeALiveBlock() throws {
        let seed: UInt64 = 182
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 3), simulator: simulator)
            let (x, y, z) = (cluster.computeNodes[0], cluster.computeNodes[1], cluster.computeNodes[2])
            let inspector = PoolInspector(cluster: cluster)
            let memoryNode = cluster.memoryNodes[0]
            let dead = try await x.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            try await cluster.fence(computeNode: 0)
            let spanWord = memoryNode.loopbackGrant.address(of: HeaderSlot(committing: dead))
            let yBlock = Locked<Block?>(nil)
            let problems = Locked<[String]>([])
            let access = try memoryNode.recoveryAccess(for: x.owner, from: NodeID(900)).interposing { raw in
                PausingConnection(raw) { _, verbs in
                    guard casOn(spanWord, in: verbs), yBlock.withLock({ $0 }) == nil else { return }
                    do {
                        _ = try await cluster.recover(computeNode: 0)
                        var block = try await y.allocate(chunkCountLog2: 0, application: application)
                        for _ in 0..<40 where block != dead { block = try await y.allocate(chunkCountLog2: 0, application: application) }
                        await y.quiesce()
                        yBlock.withLock { $0 = block }
                    } catch {
                        problems.withLock { $0.append("while R1 stalls: \(error)") }
                    }
                }
            }
            _ = try? await PoolRecovery(access: access, runtime: simulator).run()
            guard let block = yBlock.withLock({ $0 }) else { return problems.withLock { $0 } + ["R1 never reached its reclaim"] }
            if block != dead { return ["set-up: Y never got X's old chunk \(dead)"] }
            var found = problems.withLock { $0 }
            found += inspector.admit(block, owner: y.owner)
            if let zBlock = try? await z.allocate(chunkCountLog2: 0, application: application) { found += inspector.admit(zBlock, owner: z.owner) }
            await cluster.quiesce()
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// A recoverer's lease: granting a new access fences the earlier one (its verbs fail),
    /// a recovery on the memory node fences a remote one, and a remote access is refused
    /// while the memory node recovers the same node.
    @Test func oneRecovererAtATime() throws {
        let seed: UInt64 = 183
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 2), simulator: simulator)
            let x = cluster.computeNodes[0]
            _ = try await x.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            try await cluster.fence(computeNode: 0)
            let memoryNode = cluster.memoryNodes[0]
            var found: [String] = []
            let first = try memoryNode.recoveryAccess(for: x.owner, from: NodeID(900))
            let second = try memoryNode.recoveryAccess(for: x.owner, from: NodeID(901))
            let slot = first.grant.nodeSlotAddress(x.owner)
            do {
                _ = try await first.connection.readWords(slot, count: 1, rkey: first.grant.metadataKey)
                found.append("the first access still reads after a second was granted")
            } catch {}
            do { _ = try await second.connection.readWords(slot, count: 1, rkey: second.grant.metadataKey) } catch {
                found.append("the second access cannot read: \(error)")
            }
            _ = try await cluster.recover(computeNode: 0)
            do {
                _ = try await second.connection.readWords(slot, count: 1, rkey: second.grant.metadataKey)
                found.append("a remote access still reads after the memory node recovered the node itself")
            } catch {}
            // While the memory node recovers, no remote recoverer is let in.
            let refused = Locked<String?>(nil)
            let other = cluster.computeNodes[1]
            _ = try await other.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            try await cluster.fence(computeNode: 1)
            let memoryNodeRef = memoryNode
            simulator.spawn {
                do { _ = try memoryNodeRef.recoveryAccess(for: other.owner, from: NodeID(902)) } catch { refused.withLock { $0 = "\(error)" } }
            }
            _ = try await memoryNode.recover(computeNode: other.owner, runtime: simulator)
            if refused.withLock({ $0 }) == nil { found.append("a remote access was granted while the memory node recovered the same node") }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Regression test for defect 2: a restart while the old incarnation still holds the
    /// slot fails (`nodeSlotTaken`); the memory node then must still be able to fence the
    /// old incarnation. Before, `attach` kept one attachment per node and the failed
    /// restart's replaced the old one: the fence broke the new, unused queue pairs while
    /// the old incarnation went on allocating after its recovery, into a pool where its
    /// slot was free, and its blocks were never recovered.
    @Test func aFailedRestartLeavesTheOldIncarnationFenceable() throws {
        let seed: UInt64 = 184
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 2), simulator: simulator)
            let old = cluster.computeNodes[0]
            let inspector = PoolInspector(cluster: cluster)
            var found: [String] = []
            _ = try await old.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            do {
                _ = try await cluster.restart(computeNode: 0)
                found.append("a restart succeeded while the old incarnation holds the slot")
            } catch {
                guard let refused = error as? ClusterError, case .allocation(let refusal) = refused, case .nodeSlotTaken = refusal else { return ["restart: \(error)"] }
            }
            try await cluster.fence(computeNode: 0)
            _ = try await cluster.recover(computeNode: 0)
            do {
                let block = try await old.allocate(chunkCountLog2: 0, application: application)
                found.append("the old incarnation allocated \(block) after it was fenced and recovered")
            } catch {}
            await cluster.quiesce()
            found += inspector.checkAtRest()
            found += inspector.everyHeaderEmpty()
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// The lease monitor decides to fence from a table read; the fence applies to the
    /// incarnation that missed its renewals. Here X's first incarnation is fenced,
    /// recovered and restarted (incarnation 2) after the decision: fencing "the expired
    /// incarnation 1" leaves incarnation 2, which never missed a renewal, alone; fencing
    /// incarnation 2 fences it.
    @Test func aFenceDecidedForOneIncarnationSparesTheNext() throws {
        let seed: UInt64 = 185
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let memoryNode = cluster.memoryNodes[0]
            let owner = cluster.computeNodes[0].owner
            let inspector = PoolInspector(cluster: cluster)
            guard let first = inspector.nodeSlot(on: memoryNode.id, owner: owner)?.incarnation else { return ["no slot"] }
            try await cluster.fence(computeNode: 0)
            _ = try await cluster.recover(computeNode: 0)
            let reborn = try await cluster.restart(computeNode: 0)
            var found: [String] = []
            if try await memoryNode.fenceExpired(computeNode: owner, incarnation: first) {
                found.append("the fence of incarnation \(first) fenced its successor")
            }
            do throws(AllocationError) {
                let block = try await reborn.allocate(chunkCountLog2: 0, application: application)
                try await reborn.free(block, application: application)
            } catch {
                found.append("the new incarnation cannot allocate: \(error)")
            }
            await cluster.quiesce()
            if try await !memoryNode.fenceExpired(computeNode: owner, incarnation: first &+ 1) {
                found.append("the fence of the live incarnation did nothing")
            }
            if inspector.nodeSlot(on: memoryNode.id, owner: owner)?.state != .dead { found.append("the slot is not dead after the fence") }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// An attachment the node could not use is given back: `detach` breaks its queue pair
    /// and deregisters its keys, and leaves the node's other attachment working.
    @Test func anUnusedAttachmentIsGivenBack() throws {
        let seed: UInt64 = 186
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let memoryNode = cluster.memoryNodes[0]
            let node = cluster.computeNodes[0]
            let (grant, connection) = try memoryNode.attach(computeNode: node.owner, from: NodeID(1950))
            var found: [String] = []
            _ = try await connection.readWords(grant.nodeSlotAddress(node.owner), count: 1, rkey: grant.metadataKey)
            try memoryNode.detach(computeNode: node.owner, grant: grant)
            do {
                _ = try await connection.readWords(grant.nodeSlotAddress(node.owner), count: 1, rkey: grant.metadataKey)
                found.append("a detached attachment still reads")
            } catch {}
            do throws(AllocationError) {
                let block = try await node.allocate(chunkCountLog2: 0, application: application)
                try await node.free(block, application: application)
            } catch {
                found.append("the node's own attachment stopped working: \(error)")
            }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
