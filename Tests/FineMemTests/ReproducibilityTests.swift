import Testing
@testable import FineMem
import FineMemHarness

/// A seed reproduces its run in any process: no run depends on the order of a `Set` or a
/// `Dictionary`. That order changes with the process's hash seed, which a test cannot
/// change, but also with where a table's storage lies (without
/// `SWIFT_DETERMINISTIC_HASHING`, each table's seed is its storage address): a run repeated
/// with the heap laid out otherwise iterates such tables in other orders, and its trace
/// must not change. CI compares two processes (the "reproducible" step of `.ci/run`).
@Suite struct ReproducibilityTests {
    /// A crash-point run, which ends with the live nodes freeing what the inspector's
    /// ledger holds (`PoolInspector.liveBlocks`), gives one trace in five heap layouts.
    @Test(arguments: [CrashPointEnumeration.Operation.allocateChunk, .freeMultiSection])
    func crashPointRunIgnoresHashTableOrder(_ operation: CrashPointEnumeration.Operation) {
        let enumeration = CrashPointEnumeration(seed: 1)
        let reference = enumeration.runOnce(operation, crashAfter: 2, late: .all)
        #expect(reference.violations.isEmpty, "\(reference.violations.prefix(3))")
        // Arrays of many sizes kept alive to the end: the next run's tables do not take
        // the addresses the previous run's had.
        var ballast: [[UInt64]] = []
        for layout in 1...4 {
            for words in 1...64 { ballast.append(Array(repeating: UInt64(layout), count: words * layout)) }
            let again = enumeration.runOnce(operation, crashAfter: 2, late: .all)
            #expect(again.traceHash == reference.traceHash, "layout \(layout): trace \(again.traceHash), not \(reference.traceHash)")
        }
        #expect(ballast.count == 4 * 64)
    }
}
