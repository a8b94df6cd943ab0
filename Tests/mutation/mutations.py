# Protocol mutations for Tests/mutation/run: each is one small, realistic bug. The suite
# must kill every one (a test fails or the test process traps). Add one with every
# protocol change: name, file, the exact text it replaces, and the replacement.
#
# EQUIVALENT lists mutations argued to be equivalent today (the runner reports them
# without running them), with the argument; each must be moved back to MUTATIONS when the
# argument stops holding.
EQUIVALENT = [
    ("a flush does not check that the pending log is its own",
     "Sources/FineMem/Log/LogWriter.swift",
     "                    guard header.isPending(by: owner, sequence: log.sequence), let flushed = header.flushed() else { return nil }",
     "                    guard header.logPending, let flushed = header.flushed() else { return nil }",
     "A live node holds a flush job only while its own log is pending on that header (L1: "
     "nobody else commits there meanwhile, and the table keeps one entry per header, the "
     "newest), and a flush that finds the log not its own reads afresh, so the header a flush "
     "changes is pending under its own log. Recovery settles logs only of fenced nodes, whose "
     "flushes no longer execute (their queue pairs are in the error state)."),
]

MUTATIONS = [
    ("NIC compare-and-swap made a load, a compare and a store",
     "Sources/FineMem/Simulation/SimulatedNIC.swift",
     """            let (exchanged, original) = atomicWord(address).compareExchange(
                expected: expected, desired: desired, ordering: .sequentiallyConsistent)""",
     """            let original = atomicWord(address).load(ordering: .relaxed)
            let exchanged = original == expected
            if exchanged { atomicWord(address).store(desired, ordering: .relaxed) }"""),
    ("a folded log whose commit CAS lost is dropped instead of handed back",
     "Sources/FineMem/Log/WordUpdate.swift",
     "            if committed { table.remove(slot, sequence: log.sequence) } else { table.release(slot, sequence: log.sequence) }\n        }\n        if !committed { logReturned(slot) }",
     "            table.remove(slot, sequence: log.sequence)\n        }"),
    ("a foreign free of a block allocated a moment ago is not recognised",
     "Sources/FineMem/Allocation/BlockAllocator.swift",
     "        if justAllocatedByAnother(block, header: headerWord) { return .notOwner(pointer) }\n",
     ""),
    ("a chunk claim ignores a pending log",
     "Sources/FineMem/Layout/SpanHeader.swift",
     "        guard mode == .open, !logPending, Self.holds(run), marksFree(run) else { return nil }",
     "        guard mode == .open, Self.holds(run), marksFree(run) else { return nil }"),
    ("a free does not check the application",
     "Sources/FineMem/Allocation/BlockAllocator.swift",
     "            if holding == wanted { owned[BlockStart(block)] = nil }\n            return holding",
     "            if holding?.chunkCountLog2 == wanted.chunkCountLog2 { owned[BlockStart(block)] = nil; return wanted }\n            return holding"),
    ("a span opens under a section's pending log that covers it (defect 1)",
     "Sources/FineMem/Layout/SectionHeader.swift",
     "guard state(ofSpan: span) == .empty, !pendingLogCovers(span: span) else { return nil }",
     "guard state(ofSpan: span) == .empty else { return nil }"),
    ("records are written without their expected previous value (defect 1)",
     "Sources/FineMem/Log/WordUpdate.swift",
     "        .compareAndSwap(log.recordAddress, expected: log.recordBefore, desired: log.record.rawValue, rkey: metadataKey)",
     "        .writeWord(log.recordAddress, log.record.rawValue, rkey: metadataKey)"),
    ("the cache keeps whichever answer came last (defect 2)",
     "Sources/FineMem/Log/HeaderCache.swift",
     "        guard ticket >= versions[index] else { return }\n",
     ""),
    ("a span return that the cache says is done is not read again (defect 2)",
     "Sources/FineMem/Allocation/SpanLifecycle.swift",
     "            .section(section), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax, rereadOnRefusal: true), on: link, trace: &trace\n        ) { $0.closingSpan(span) }\n        switch outcome {\n        case .updated: return\n        case .refused(let current):\n            throw",
     "            .section(section), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax), on: link, trace: &trace\n        ) { $0.closingSpan(span) }\n        switch outcome {\n        case .updated: return\n        case .refused(let current):\n            _ = current; return;\n            throw"),
    ("a flush gives up after its bound (defect 3)",
     "Sources/FineMem/Log/LogWriter.swift",
     "                // The record is in place; only the header's bit remains to be cleared.\n                handling = .keep",
     "                return nil\n                handling = .keep"),
    ("a span's entry is flipped without the span naming its opener (defect 4)",
     "Sources/FineMem/Allocation/SpanLifecycle.swift",
     "        let mark: UpdateOutcome<SpanHeader> = try await update(spanSlot, UpdatePolicy(attemptsMax: 1), on: link, trace: &trace) {\n            $0.markingOpening(owner: owner)\n        }\n        guard case .updated = mark else { return nil }",
     "        let mark: UpdateOutcome<SpanHeader> = try await update(spanSlot, UpdatePolicy(attemptsMax: 1), on: link, trace: &trace) {\n            $0.markingOpening(owner: owner)\n        }\n        guard case .updated = mark else { return nil }\n        let _: UpdateOutcome<SpanHeader> = try await update(spanSlot, UpdatePolicy(attemptsMax: 1), on: link, trace: &trace) { $0.abandoningOpening(owner: owner) }\n        let _: UpdateOutcome<SpanHeader> = try await update(spanSlot, UpdatePolicy(attemptsMax: 1), on: link, trace: &trace) { $0.markingOpening(owner: owner) }"),
    ("the rollback of a lost multi-section claim restores the claimed word",
     "Sources/FineMem/Allocation/MultiSection.swift",
     "            ) { slot, _ in bases[slot] }",
     "            ) { slot, header in header }"),
    ("a multi-section claim's intent clear is not fenced behind its rollback",
     "Sources/FineMem/Allocation/MultiSection.swift",
     "after: [link.intentWrite(.none, slot: intentSlot).fenced()]",
     "after: [link.intentWrite(.none, slot: intentSlot)]"),
    ("an allocation's search does not wait for a span under a pending log",
     "Sources/FineMem/Allocation/HeaderSearch.swift",
     "                if rawSection.pendingLogCovers(span: span) {\n                    if transient == nil { transient = [.section(section)] }\n                    continue\n                }",
     "                if rawSection.pendingLogCovers(span: span) {\n                    continue\n                }"),
    ("recovery leaves the dead node's records allocated",
     "Sources/FineMem/Recovery/RecoveryPass.swift",
     "                for run in runs where header.marksFree(run) { freedRecord(first + run.offset, layer: .chunk, sequence: header.log.sequence) }",
     "                for run in runs where header.marksFree(run) && false { freedRecord(first + run.offset, layer: .chunk, sequence: header.log.sequence) }"),
    ("recovery keeps multi-section blocks it already freed in its index (review finding F1)",
     "Sources/FineMem/Recovery/Recovery.swift",
     "        multiSectionBlock.removeAll(keepingCapacity: true)\n",
     ""),
    ("fencing does not break the node's queue pairs (its posted verbs still execute)",
     "Sources/FineMem/MemoryNode/MemoryNode.swift",
     "                try nic.breakConnections(of: regions.metadata.protectionDomain)\n",
     ""),
]
