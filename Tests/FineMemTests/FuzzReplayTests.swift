import Foundation
import FineMem
import FineMemHarness
import FuzzTargets
import Testing

/// Runs the fuzz targets on inputs from a seeded generator, so that `swift test` exercises
/// them; libFuzzer explores further (README, "Fuzzing").
@Suite struct FuzzReplayTests {
    private static func input(seed: UInt64, length: Int) -> [UInt8] {
        var random = SeededRandom(seed: seed)
        return (0..<length).map { _ in UInt8(truncatingIfNeeded: random.next()) }
    }

    @Test(arguments: 1...12 as ClosedRange<UInt64>) func allocatorPrograms(seed: UInt64) {
        let bytes = Self.input(seed: seed, length: 8 + 2 * 96)
        let findings = allocatorFindings(bytes)
        #expect(findings.isEmpty, "input seed \(seed): \(findings.prefix(3))")
    }

    @Test(arguments: 1...16 as ClosedRange<UInt64>) func recoveryPrograms(seed: UInt64) {
        let findings = recoveryFindings(Self.input(seed: seed, length: 8 + 2 * 64))
        #expect(findings.isEmpty, "input seed \(seed): \(findings.prefix(3))")
    }

    @Test(arguments: 1...16 as ClosedRange<UInt64>) func flushPrograms(seed: UInt64) {
        let findings = flushFindings(Self.input(seed: seed, length: 8 + 2 * 80))
        #expect(findings.isEmpty, "input seed \(seed): \(findings.prefix(3))")
    }

    /// The committed corpus of each target (`Fuzz/corpus/TARGET`, grown by `Fuzz/run`),
    /// replayed without libFuzzer.
    @Test(arguments: ["allocator", "layout", "recovery", "flush"])
    func committedCorpus(target: String) throws {
        let directory = URL(filePath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appending(path: "Fuzz/corpus/\(target)")
        let files = try FileManager.default.contentsOfDirectory(at: directory, includingPropertiesForKeys: nil)
        #expect(!files.isEmpty, "no corpus in \(directory.path)")
        for file in files.sorted(by: { $0.path < $1.path }) {
            let bytes = [UInt8](try Data(contentsOf: file))
            let findings: [String] = switch target {
            case "allocator": allocatorFindings(bytes)
            case "layout": layoutFindings(bytes)
            case "recovery": recoveryFindings(bytes)
            default: flushFindings(bytes)
            }
            #expect(findings.isEmpty, "\(file.lastPathComponent): \(findings.prefix(3))")
        }
    }

    /// The seeded inputs of the tests above run on both shard counts (bit 58 of the seed
    /// word, `FuzzShape`): 4 cache shards with a queue pair each in some, 1 in others
    /// (each program also fails when its nodes lack the shards it picked).
    @Test func seededInputsRunOnOneShardAndOnFour() {
        let shards = (UInt64(1)...16).map { fuzzCacheShards(Self.input(seed: $0, length: 8)) }
        #expect(Set(shards) == [1, 4], "shards by input seed 1-16: \(shards)")
        #expect(shards.prefix(12).contains(4), "no allocator program of input seeds 1-12 runs on 4 shards: \(shards)")
    }

    @Test func emptyAndTinyProgramsAreValid() {
        #expect(allocatorFindings([]).isEmpty)
        #expect(allocatorFindings([1, 2, 3]).isEmpty)
    }

    @Test func layoutWords() {
        var decodedWords = 0
        for seed in 1...200 as ClosedRange<UInt64> {
            let (findings, decoded) = layoutRun(Self.input(seed: seed, length: 12 * 8))
            #expect(findings == [], "input seed \(seed): \(findings.prefix(3))")
            decodedWords += decoded
        }
        #expect(decodedWords > 100, "random words must decode as headers often enough to exercise the transitions")
        #expect(layoutFindings([]) == [])
        #expect(layoutFindings([UInt8](repeating: 0xFF, count: 64)) == [])
    }
}
