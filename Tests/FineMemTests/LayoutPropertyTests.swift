import PropertyBased
import Testing
@testable import FineMem
import FineMemHarness

private let ownerGen = Gen.uint16(in: 0...OwnerID.maxRawValue).map { OwnerID($0) }
private let sequenceGen = Gen.uint8(in: 0...63).map { LogSequence(rawValue: $0) }

/// A valid span header with random fields.
private let spanHeaderGen = zip(
    Gen.uint32(), Gen<SpanHeader.Mode>.case, Gen.bool, Gen.bool, Gen.int(in: 0...4), Gen.int(in: 0...31), ownerGen, sequenceGen
).map { bitmap, mode, contended, pending, size, offset, owner, sequence in
    let aligned = offset / (1 << size) * (1 << size)
    return SpanHeader(
        bitmap: mode == .open ? bitmap : 0, mode: mode, contended: contended, logPending: pending,
        log: TemporaryLog(offset: UInt8(aligned), sizeCode: UInt8(size), owner: owner, sequence: sequence))
}

private let sectionHeaderGen = zip(
    Gen<SectionHeader.SpanState>.case.array(of: 16), Gen.bool, Gen.bool, Gen.int(in: 0...5), Gen.int(in: 0...15), ownerGen, sequenceGen
).map { states, contended, pending, size, offset, owner, sequence in
    let aligned = size == 5 ? 0 : offset / (1 << size) * (1 << size)
    return SectionHeader(
        spanStates: states, contended: contended, logPending: pending,
        log: TemporaryLog(offset: UInt8(aligned), sizeCode: UInt8(size), owner: owner, sequence: sequence))
}

@Suite struct SpanHeaderProperties {
    @Test func roundTripAndNoBleed() async {
        await propertyCheck(count: 500, input: Gen.uint32(), Gen<SpanHeader.Mode>.case, Gen.bool, Gen.bool, zip(Gen.int(in: 0...4), Gen.int(in: 0...31), ownerGen, sequenceGen)) {
            bitmap, mode, contended, pending, log in
            let (size, offset, owner, sequence) = log
            let aligned = UInt8(offset / (1 << size) * (1 << size))
            let map = mode == .open ? bitmap : 0
            let header = SpanHeader(
                bitmap: map, mode: mode, contended: contended, logPending: pending,
                log: TemporaryLog(offset: aligned, sizeCode: UInt8(size), owner: owner, sequence: sequence))
            let decoded = SpanHeader(rawValue: header.rawValue)
            #expect(decoded == header)
            #expect(header.bitmap == map && header.mode == mode && header.contended == contended && header.logPending == pending)
            #expect(header.log == TemporaryLog(offset: aligned, sizeCode: UInt8(size), owner: owner, sequence: sequence))
        }
    }

    @Test func decodingAnyWordGivesNilOrTheSameWord() async {
        await propertyCheck(count: 1000, input: Gen.uint64()) { word in
            // A word that decodes is rebuilt, bit for bit, from the fields it decodes to:
            // no bit of it is outside a field, and no field loses a bit.
            if let header = SpanHeader(rawValue: word) {
                let rebuilt = SpanHeader(bitmap: header.bitmap, mode: header.mode, contended: header.contended, logPending: header.logPending, log: header.log)
                #expect(rebuilt.rawValue == word && header.isValid, "word 0x\(String(word, radix: 16))")
            }
        }
    }

    @Test func transitionsKeepTheWordValidAndDoExactlyTheirJob() async {
        await propertyCheck(count: 1000, input: spanHeaderGen, Gen.int(in: 0...31), Gen.int(in: 0...4), ownerGen) { header, offset, size, owner in
            let mask = SpanHeader.runMask(HeaderRun(offset: offset, countLog2: size))
            let aligned = offset % (1 << size) == 0
            if let claimed = header.claiming(HeaderRun(offset: offset, countLog2: size), owner: owner) {
                #expect(aligned && header.mode == .open && !header.logPending && header.bitmap & mask == 0)
                #expect(claimed.bitmap == header.bitmap | mask && claimed.logPending && claimed.mode == .open)
                #expect(claimed.log.owner == owner && claimed.log.sequence == header.log.sequence.next)
                #expect(claimed.logDescribesAllocation && SpanHeader(rawValue: claimed.rawValue) == claimed)
                #expect(claimed.releasing(HeaderRun(offset: offset, countLog2: size), owner: owner) == nil, "pending log must block the next operation")
                let flushed = claimed.flushed()!
                let released = flushed.releasing(HeaderRun(offset: offset, countLog2: size), owner: owner)!
                #expect(released.bitmap == header.bitmap && !released.logDescribesAllocation && released.isValid)
            } else {
                #expect(!aligned || header.mode != .open || header.logPending || header.bitmap & mask != 0)
            }
            if let opened = header.opening(HeaderRun(offset: offset, countLog2: size), owner: owner) {
                #expect(header.mode == .opening && header.log.owner == owner && opened.mode == .open && opened.bitmap == mask && opened.isValid)
                #expect(opened.logPending && opened.log.owner == owner)
            }
            if let marked = header.markingOpening(owner: owner) {
                // An opening names its owner from the first verb on, and only it may go on.
                #expect(header.mode == .closed && !header.logPending && marked.mode == .opening && marked.log.owner == owner && marked.isValid)
                #expect(marked.markingOpening(owner: owner) == nil && marked.closing() == nil)
                #expect(marked.abandoningOpening(owner: owner)?.mode == .closed)
                let other = OwnerID(owner.rawValue == 0 ? 1 : owner.rawValue - 1)
                #expect(marked.abandoningOpening(owner: other) == nil)
                #expect(marked.opening(HeaderRun(offset: 0, countLog2: 0), owner: other) == nil)
                #expect(marked.opening(HeaderRun(offset: 0, countLog2: 0), owner: owner)?.mode == .open)
            } else {
                #expect(header.mode != .closed || header.logPending || header.bitmap != 0)
            }
            if let released = header.releasing(HeaderRun(offset: offset, countLog2: size), owner: owner) {
                #expect(header.bitmap & mask == mask && released.bitmap == header.bitmap & ~mask && released.isValid)
            }
            if let closing = header.closing() {
                #expect(header.bitmap == 0 && closing.mode == .closing && closing.isValid)
                #expect(closing.opening(HeaderRun(offset: 0, countLog2: 0), owner: owner) == nil)
                #expect(closing.closed()?.mode == .closed)
            }
            if let flushed = header.flushed() {
                #expect(header.logPending && !flushed.logPending && flushed.bitmap == header.bitmap && flushed.log == header.log)
            }
            let marked = header.with(contended: !header.contended)
            #expect(marked.contended != header.contended && marked.bitmap == header.bitmap && marked.log == header.log)
        }
    }

    @Test func firstFreeRunIsAlignedAndFree() async {
        await propertyCheck(count: 500, input: Gen.uint32(), Gen.int(in: 0...4)) { bitmap, size in
            let header = SpanHeader(bitmap: bitmap, mode: .open, contended: false, logPending: false, log: .empty)
            if let run = header.firstFreeRun(countLog2: size) {
                #expect(run.countLog2 == size && run.offset % (1 << size) == 0 && bitmap & SpanHeader.runMask(run) == 0)
                #expect(header.claiming(run, owner: OwnerID(1)) != nil)
                for o in stride(from: 0, to: run.offset, by: 1 << size) {
                    #expect(bitmap & SpanHeader.runMask(HeaderRun(offset: o, countLog2: size)) != 0, "a lower free run at \(o)")
                }
            } else {
                for o in stride(from: 0, to: 32, by: 1 << size) {
                    #expect(bitmap & SpanHeader.runMask(HeaderRun(offset: o, countLog2: size)) != 0)
                }
            }
        }
    }
}

@Suite struct SectionHeaderProperties {
    @Test func roundTripAndNoBleed() async {
        await propertyCheck(count: 500, input: sectionHeaderGen) { header in
            #expect(SectionHeader(rawValue: header.rawValue) == header)
            let rebuilt = SectionHeader(spanStates: header.spanStates, contended: header.contended, logPending: header.logPending, log: header.log)
            #expect(rebuilt.rawValue == header.rawValue)
            // Changing one span's state changes nothing else.
            for span in [0, 7, 15] {
                var states = header.spanStates
                states[span] = states[span] == .whole ? .empty : .whole
                let changed = SectionHeader(spanStates: states, contended: header.contended, logPending: header.logPending, log: header.log)
                #expect(changed.spanStates == states && changed.log == header.log && changed.contended == header.contended)
            }
        }
    }

    @Test func decodingAnyWordGivesNilOrTheSameWord() async {
        await propertyCheck(count: 1000, input: Gen.uint64()) { word in
            if let header = SectionHeader(rawValue: word) {
                let rebuilt = SectionHeader(spanStates: header.spanStates, contended: header.contended, logPending: header.logPending, log: header.log)
                #expect(rebuilt.rawValue == word && header.isValid, "word 0x\(String(word, radix: 16))")
            }
        }
    }

    @Test func transitionsKeepTheWordValid() async {
        await propertyCheck(count: 1000, input: sectionHeaderGen, Gen.int(in: 0...15), Gen.int(in: 0...4), ownerGen) { header, offset, size, owner in
            let results: [SectionHeader?] = [
                header.claiming(HeaderRun(offset: offset, countLog2: size), owner: owner),
                header.releasing(HeaderRun(offset: offset, countLog2: size), owner: owner),
                header.claimingForMultiSection(owner: owner), header.releasingFromMultiSection(owner: owner),
                header.flushed(), header.openingSpan(offset), header.closingSpan(offset),
                header.hintingSpan(offset, avoid: true), header.hintingSpan(offset, avoid: false),
            ]
            for case let result? in results {
                #expect(result.isValid && SectionHeader(rawValue: result.rawValue) == result)
            }
            if let claimed = results[0] {
                #expect(claimed.logPending && claimed.logDescribesAllocation && claimed.logSpanRange == offset..<offset + (1 << size))
                for span in 0..<16 where !claimed.logSpanRange.contains(span) {
                    #expect(claimed.state(ofSpan: span) == header.state(ofSpan: span))
                }
                #expect(claimed.openingSpan(offset) == nil)
            }
            if let opened = results[5] {
                #expect(opened.log == header.log && opened.logPending == header.logPending, "span-state changes keep the log")
                #expect(!header.pendingLogCovers(span: offset), "a span under a pending log that covers it stays out of chunk mode")
            } else if header.state(ofSpan: offset) == .empty {
                #expect(header.pendingLogCovers(span: offset))
            }
        }
    }
}

@Suite struct RecordProperties {
    @Test func fullLogRecordRoundTrip() async {
        await propertyCheck(count: 500, input: zip(Gen.bool, ownerGen, Gen.uint16(), Gen.int(in: 0...31)), Gen<FullLogRecord.Layer>.case, sequenceGen, Gen.uint16()) {
            head, layer, sequence, incarnation in
            let (allocated, owner, application, size) = head
            let record = FullLogRecord(
                allocated: allocated, owner: owner, application: ApplicationID(application), chunkCountLog2: size, layer: layer,
                sequence: sequence, incarnation: incarnation)
            #expect(FullLogRecord(rawValue: record.rawValue) == record)
            #expect(record.isAllocated == allocated && record.owner == owner && record.application.rawValue == application)
            #expect(record.chunkCountLog2 == size && record.layer == layer && record.sequence == sequence && record.incarnation == incarnation)
            if let freed = record.freed(sequence: sequence.next) {
                #expect(allocated && !freed.isAllocated && freed.owner == owner && freed.chunkCountLog2 == size && freed.sequence == sequence.next)
            } else {
                #expect(!allocated)
            }
        }
    }

    @Test func nodeSlotLifecycle() async {
        await propertyCheck(count: 500, input: Gen.uint64(in: 0...(1 << 40) - 1), Gen<NodeSlot.State>.case, Gen.uint16()) { beat, state, incarnation in
            let slot = NodeSlot(heartbeat: beat, state: state, incarnation: incarnation)
            #expect(NodeSlot(rawValue: slot.rawValue) == slot)
            #expect(slot.heartbeat == beat && slot.state == state && slot.incarnation == incarnation)
            let next: [NodeSlot?] = [slot.registering(), slot.beating(), slot.suspecting(), slot.declaringDead(), slot.recovering(), slot.recovered()]
            for case let n? in next { #expect(NodeSlot(rawValue: n.rawValue) == n) }
            #expect((next[0] != nil) == (state == .free))
            if let registered = next[0] { #expect(registered.incarnation == incarnation &+ 1 && registered.state == .alive) }
            if let beaten = next[1] { #expect(beaten.heartbeat == (beat + 1) & ((1 << 40) - 1)) }
            #expect((next[3] != nil) == (state == .suspected), "only a suspected node is declared dead")
        }
    }

    @Test func intentRecordRoundTrip() async {
        await propertyCheck(count: 500, input: Gen<IntentRecord.Kind>.case, Gen.int(in: 0...IntentRecord.maxFirstSection), Gen.int(in: 0...31), ownerGen, Gen.uint16()) {
            kind, first, count, owner, application in
            let record = IntentRecord(kind: kind, firstSection: first, sectionCountLog2: count, owner: owner, application: ApplicationID(application))
            #expect(IntentRecord(rawValue: record.rawValue) == record)
            #expect(record.isValid && record.kind == kind && record.firstSection == first && record.sectionCountLog2 == count)
            #expect(record.owner == owner && record.application.rawValue == application)
        }
    }

    @Test func capabilityEntryRotation() async {
        await propertyCheck(count: 500, input: Gen.uint32(), Gen.uint32(), Gen.uint32()) { main, backup, fresh in
            let entry = CapabilityEntry(main: RKey(rawValue: main), backup: RKey(rawValue: backup))
            #expect(CapabilityEntry(rawValue: entry.rawValue) == entry && entry.main.rawValue == main && entry.backup.rawValue == backup)
            if let swapped = entry.swapped() {
                #expect(swapped.main.rawValue == backup && swapped.backup.rawValue == main)
            } else {
                #expect(main == 0 || backup == 0)
            }
            if let regenerated = entry.regenerated(backup: RKey(rawValue: fresh)) {
                #expect(regenerated.main == entry.main && regenerated.backup.rawValue == fresh && fresh != main)
            }
        }
    }

    @Test func oneFieldAtMaximumLeavesTheOthersZero() {
        let owner = FullLogRecord(allocated: false, owner: OwnerID(OwnerID.maxRawValue), application: ApplicationID(0), chunkCountLog2: 0, layer: .chunk, sequence: LogSequence(rawValue: 0), incarnation: 0)
        #expect(owner.application.rawValue == 0 && owner.chunkCountLog2 == 0 && owner.incarnation == 0 && !owner.isAllocated)
        let application = FullLogRecord(allocated: false, owner: OwnerID(0), application: ApplicationID(0xFFFF), chunkCountLog2: 0, layer: .chunk, sequence: LogSequence(rawValue: 0), incarnation: 0)
        #expect(application.owner.rawValue == 0 && application.chunkCountLog2 == 0)
        let span = SpanHeader(bitmap: ~0, mode: .open, contended: false, logPending: false, log: .empty)
        #expect(span.mode == .open && !span.contended && span.log == .empty)
        let logOnly = SpanHeader(bitmap: 0, mode: .closed, contended: false, logPending: false,
                                 log: TemporaryLog(offset: 16, sizeCode: 4, owner: OwnerID(OwnerID.maxRawValue), sequence: LogSequence(rawValue: 63)))
        #expect(logOnly.bitmap == 0 && logOnly.mode == .closed && !logOnly.logPending)
        let slot = NodeSlot(heartbeat: (1 << 40) - 1, state: .free, incarnation: 0)
        #expect(slot.state == .free && slot.incarnation == 0)
    }
}

@Suite struct GeometryTests {
    @Test func arraysDoNotOverlapAndDataIsSectionAligned() throws {
        for sections in [1, 7, 512, 32_768] {
            let g = try PoolGeometry(sectionCount: sections, computeNodeSlots: 64, intentSlotsPerNode: 8)
            #expect(g.nodeTableOffset >= PoolGeometry.superblockBytes)
            #expect(g.intentTableOffset >= g.nodeTableOffset + 8 * 64)
            #expect(g.sectionHeadersOffset >= g.intentTableOffset + 8 * 64 * 8)
            #expect(g.spanHeadersOffset >= g.sectionHeaderOffset(sections - 1) + 8)
            #expect(g.fullLogOffset >= g.spanHeaderOffset(section: sections - 1, span: 15) + 8)
            #expect(g.capabilitiesOffset >= g.fullLogOffset(chunk: g.chunkCount - 1) + 8)
            #expect(g.metadataBytes >= g.capabilityOffset(chunk: g.chunkCount - 1) + 8)
            #expect(g.dataOffset % PoolGeometry.sectionBytes == 0)
            #expect(g.chunk(atDataOffset: g.dataOffset(chunk: g.chunkCount - 1)) == g.chunkCount - 1)
            #expect(g.chunk(atDataOffset: g.dataOffset - 1) == nil && g.chunk(atDataOffset: g.totalBytes) == nil)
        }
    }

    @Test func overheadIsAboutTheFigureOfThePaper() throws {
        let g = try PoolGeometry(dataBytes: 1 << 30)
        #expect(g.sectionCount == 512)
        // 16 B per chunk (full log + capability) plus headers: 16.27 / 4096.
        #expect(g.metadataOverheadPercent > 0.39 && g.metadataOverheadPercent < 0.40)
    }

    @Test func badGeometryIsATypedError() {
        #expect(throws: LayoutError.sectionCountOutOfRange(0)) { try PoolGeometry(sectionCount: 0) }
        #expect(throws: LayoutError.computeNodeSlotsOutOfRange(0)) { try PoolGeometry(sectionCount: 1, computeNodeSlots: 0) }
        #expect(throws: LayoutError.intentSlotsOutOfRange(65)) { try PoolGeometry(sectionCount: 1, intentSlotsPerNode: 65) }
    }

    @Test func superblockRoundTripAndRejections() throws {
        let g = try PoolGeometry(sectionCount: 9, computeNodeSlots: 5, intentSlotsPerNode: 3)
        let block = Superblock(geometry: g, epoch: 77)
        #expect(try Superblock(words: block.words) == block)
        var bad = block.words
        bad[0] ^= 1
        #expect(throws: LayoutError.badMagic(bad[0])) { try Superblock(words: bad) }
        bad = block.words
        bad[1] = 9
        #expect(throws: LayoutError.unsupportedVersion(9)) { try Superblock(words: bad) }
    }
}

/// The one description both block layers share: where a block sits in the header that
/// commits it, and back.
@Suite struct BlockHeaderProperties {
    @Test func aBlockAndItsRunDescribeEachOther() async {
        await propertyCheck(count: 500, input: Gen.int(in: 0...63), Gen.int(in: 0...9), Gen.int(in: 0...511)) { section, chunkCountLog2, chunk in
            let firstChunk = section * 512 + chunk / (1 << chunkCountLog2) * (1 << chunkCountLog2)
            let block = Block(memoryNode: NodeID(3), firstChunk: firstChunk, chunkCountLog2: chunkCountLog2)
            let slot = HeaderSlot(committing: block)
            if block.layer == .chunk {
                let run = SpanHeader.run(of: block)
                #expect(SpanHeader.holds(run) && SpanHeader.block(at: run, of: slot, on: NodeID(3)) == block)
                #expect(slot == .span(section: section, span: block.spanInSection))
            } else {
                let run = SectionHeader.run(of: block)
                #expect(SectionHeader.holds(run) && SectionHeader.block(at: run, of: slot, on: NodeID(3)) == block)
                #expect(slot == .section(section) && run.offset == block.spanInSection)
            }
        }
    }

    @Test func sectionFirstFreeRunIsAlignedAndEmpty() async {
        await propertyCheck(count: 500, input: Gen<SectionHeader.SpanState>.case.array(of: 16), Gen.int(in: 0...4)) { states, size in
            let header = SectionHeader(spanStates: states, contended: false, logPending: false, log: .empty)
            if let run = header.firstFreeRun(countLog2: size) {
                #expect(run.countLog2 == size && run.offset % (1 << size) == 0 && run.units.allSatisfy { states[$0] == .empty })
                #expect(header.claiming(run, owner: OwnerID(1))?.marksAllocated(run) == true)
                for offset in stride(from: 0, to: run.offset, by: 1 << size) {
                    #expect(!(offset..<offset + (1 << size)).allSatisfy { states[$0] == .empty }, "a lower empty run at \(offset)")
                }
            } else {
                for offset in stride(from: 0, to: 16, by: 1 << size) {
                    #expect(!(offset..<offset + (1 << size)).allSatisfy { states[$0] == .empty })
                }
            }
        }
    }
}

/// The bit-folding search for free runs against the definition (the lowest aligned offset
/// whose units are all free), over bitmaps of every density: random words ANDed together
/// leave long free runs, which uniform words almost never have.
@Suite struct FreeRunSearch {
    @Test func spanAndSectionSearchesFindTheLowestFreeRun() {
        let seed: UInt64 = 7
        var random = SeededRandom(seed: seed)
        for _ in 0..<20_000 {
            var used = UInt32(truncatingIfNeeded: random.next())
            for _ in 0..<Int(random.next() % 5) { used &= UInt32(truncatingIfNeeded: random.next()) }
            for size in 0...4 {
                let span = SpanHeader(bitmap: used, mode: .open, contended: false, logPending: false, log: .empty)
                let spanExpected = stride(from: 0, to: 32, by: 1 << size).first { used & SpanHeader.runMask(HeaderRun(offset: $0, countLog2: size)) == 0 }
                #expect(span.firstFreeRun(countLog2: size)?.offset == spanExpected, "seed \(seed): span bitmap \(used), size \(size)")
                // The same word as 16 two-bit span states (each state drawn from two bits).
                let states = (0..<16).map { SectionHeader.SpanState(rawValue: UInt64(used >> (2 * UInt32($0))) & 3)! }
                let section = SectionHeader(spanStates: states, contended: false, logPending: false, log: .empty)
                let sectionExpected = stride(from: 0, to: 16, by: 1 << size).first { offset in
                    (offset..<offset + (1 << size)).allSatisfy { states[$0] == .empty }
                }
                #expect(section.firstFreeRun(countLog2: size)?.offset == sectionExpected, "seed \(seed): section states \(used), size \(size)")
            }
        }
    }
}
