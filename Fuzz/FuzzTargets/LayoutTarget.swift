import FineMem
import FineMemHarness

/// Decodes arbitrary words as every metadata type and applies every transition: a word
/// that decodes must encode to itself, and every transition must give a word that decodes
/// to the same value. Traps on a violation (a finding).
package func fuzzLayout(_ bytes: [UInt8]) {
    if let finding = layoutFindings(bytes).first { fatalError("layout fuzz finding: \(finding)") }
}

/// The findings of `fuzzLayout` on `bytes`, and how many words decoded as some type
/// (the replay test checks that inputs exercise the decoders).
package func layoutFindings(_ bytes: [UInt8]) -> [String] {
    layoutRun(bytes).findings
}

/// Runs the layout checks on `bytes`: the findings, and the count of words that decoded.
package func layoutRun(_ bytes: [UInt8]) -> (findings: [String], decodedWords: Int) {
    var findings: [String] = []
    var decodedWords = 0
    func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition { findings.append(message()) }
    }
    var input = FuzzInput(bytes)
    repeat {
        let word = input.word()
        let owner = OwnerID(UInt16(input.byte()) << 6 | UInt16(input.byte() & 0x3F))
        let offset = Int(input.byte() % 32)
        let size = Int(input.byte() % 5)
        if let span = SpanHeader(rawValue: word) {
            decodedWords += 1
            check(span.rawValue == word, "span header \(word) re-encodes differently")
            let next = [
                span.claiming(HeaderRun(offset: offset, countLog2: size), owner: owner), span.opening(HeaderRun(offset: offset, countLog2: size), owner: owner),
                span.releasing(HeaderRun(offset: offset, countLog2: size), owner: owner), span.flushed(), span.closing(), span.closed(),
                span.markingOpening(owner: owner), span.abandoningOpening(owner: owner),
            ]
            for case let header? in next {
                check(SpanHeader(rawValue: header.rawValue) == header && header.isValid, "span transition from \(word) gave \(header.rawValue)")
            }
        }
        if let section = SectionHeader(rawValue: word) {
            decodedWords += 1
            check(section.rawValue == word, "section header \(word) re-encodes differently")
            let span = offset % 16
            let next = [
                section.claiming(HeaderRun(offset: span, countLog2: size), owner: owner), section.releasing(HeaderRun(offset: span, countLog2: size), owner: owner),
                section.claimingForMultiSection(owner: owner), section.releasingFromMultiSection(owner: owner), section.flushed(),
                section.openingSpan(span), section.closingSpan(span), section.hintingSpan(span, avoid: size % 2 == 0),
            ]
            for case let header? in next {
                check(SectionHeader(rawValue: header.rawValue) == header && header.isValid, "section transition from \(word) gave \(header.rawValue)")
            }
        }
        if let record = FullLogRecord(rawValue: word) {
            check(record.rawValue == word, "record \(word) re-encodes differently")
            if let freed = record.freed(sequence: record.sequence.next) {
                check(FullLogRecord(rawValue: freed.rawValue) == freed && !freed.isAllocated && freed.owner == record.owner, "freed record of \(word)")
            }
        }
        if let slot = NodeSlot(rawValue: word) {
            for case let next? in [slot.registering(), slot.beating(), slot.suspecting(), slot.declaringDead(), slot.recovering(), slot.recovered()] {
                check(NodeSlot(rawValue: next.rawValue) == next, "node slot transition from \(word)")
            }
        }
        if let intent = IntentRecord(rawValue: word), intent.isValid {
            let again = IntentRecord(kind: intent.kind, firstSection: intent.firstSection, sectionCountLog2: intent.sectionCountLog2, owner: intent.owner, application: intent.application)
            check(again == intent, "intent \(word) does not rebuild from its fields")
        }
        let capability = CapabilityEntry(rawValue: word)
        if let swapped = capability.swapped() {
            check(swapped.swapped() == capability, "capability \(word) does not swap back")
        }
    } while !input.isAtEnd
    return (findings, decodedWords)
}
