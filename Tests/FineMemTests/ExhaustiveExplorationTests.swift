import Testing
@testable import FineMem
import FineMemHarness

// Exhaustive interleaving exploration: scripted runs (the NIC's order of verbs between
// connections comes from a choice sequence) and the depth-first search over every choice
// sequence. Every failure message names the script that reproduces the run.

/// The scripts as `finemem explore --replay` takes them, for failure messages.
private func scriptsText(_ violations: [ExhaustiveExploration.Violation]) -> String {
    violations.map { "[\($0.scriptText)]: \($0.messages.joined(separator: "; "))" }.joined(separator: "\n")
}

/// Two compute nodes (1 and 2) each add one to word x once, as a read-modify-write
/// without retry: READ x, then CAS x from what it read to that plus one. When both READs
/// come before both CASes, one CAS fails and an update is lost: x ends as 1, which the
/// run reports as a violation.
private func racyIncrement(script: [Int]) -> ScriptedRun {
    let simulator = Simulator(seed: 1, latency: LatencyModel(), exploration: .scripted(script))
    let target: (SimulatedNIC, ProtectionDomain, MemoryRegion)
    do { target = try makeTarget(node: 0) } catch {
        return ScriptedRun(simulator: simulator, violations: ["no target: \(error)"], outcome: "no target")
    }
    let (nic, pd, region) = target
    let errors = Locked<[String]>([])
    for node: UInt16 in [1, 2] {
        let connection = nic.connect(from: NodeID(node), protectionDomain: pd, simulator: simulator)
        simulator.spawn {
            do throws(FabricError) {
                let seen = try await connection.readWords(region.address, count: 1, rkey: region.rkey)[0]
                _ = try await connection.compareAndSwap(region.address, expected: seen, desired: seen + 1, rkey: region.rkey)
            } catch {
                errors.withLock { $0.append("node \(node): \(error)") }
            }
        }
    }
    simulator.run()
    let x = nic.peekWord(region.address)
    let lost = x == 2 ? [] : ["lost update: x = \(x) after two increments"]
    return ScriptedRun(simulator: simulator, violations: errors.withLock { $0 } + lost, outcome: "x = \(x)")
}

/// One connection posts [CAS x 0 -> 1, WRITE x := 2] (the WRITE fenced or not) in one
/// batch; answers the value the CAS found (0: in order, 2: the WRITE passed it).
private func casThenWrite(script: [Int], fenced: Bool, reordering: Bool) -> ScriptedRun {
    let simulator = Simulator(seed: 1, latency: LatencyModel(), exploration: .scripted(script))
    simulator.reordersUnfencedWrites = reordering
    let target: (SimulatedNIC, ProtectionDomain, MemoryRegion)
    do { target = try makeTarget(node: 0) } catch {
        return ScriptedRun(simulator: simulator, violations: ["no target: \(error)"], outcome: "no target")
    }
    let (nic, pd, region) = target
    let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
    let found = Locked<String>("no answer")
    simulator.spawn {
        let write = Verb.writeWord(region.address, 2, rkey: region.rkey)
        do throws(FabricError) {
            let results = try await connection.post([
                .compareAndSwap(region.address, expected: 0, desired: 1, rkey: region.rkey), fenced ? write.fenced() : write,
            ])
            found.withLock { $0 = "CAS found \(results[0].compareAndSwap.original)" }
        } catch {
            found.withLock { $0 = "\(error)" }
        }
    }
    simulator.run()
    return ScriptedRun(simulator: simulator, violations: [], outcome: found.withLock { $0 })
}

@Suite struct ScriptedRunTests {
    /// The enumeration reaches every order of the four verbs: 6 interleavings, of which
    /// the 4 with both READs before both CASes lose an update, each named by its script.
    @Test func theRacyIncrementLosesAnUpdateInExactlyTheInterleavingsThatReadTwiceFirst() {
        let report = ExhaustiveExploration.enumerate("racy increment", runsMax: 100) { racyIncrement(script: $0) }
        #expect(report.complete && report.aborted == nil, "\(report)")
        #expect(report.interleavings == 6 && report.choicePoints == 5 && report.deepestRun == 3, "\(report)")
        #expect(report.violatingRuns == 4, "\(report)\n\(scriptsText(report.violations))")
        // Options are ordered by local node: 0 is node 1's next verb, 1 is node 2's.
        let scripts = Set(report.violations.map(\.script))
        #expect(scripts == [[0, 1], [0, 1, 1], [1], [1, 0, 1]], "lost updates under \(scriptsText(report.violations))")
        #expect(report.outcomes == ["x = 2": 2, "x = 1": 4], "\(report.outcomes)")
    }

    @Test func aReplayedScriptGivesTheSameRun() {
        for script in [[], [0, 1], [1, 0, 1], [1, 1]] as [[Int]] {
            let first = racyIncrement(script: script)
            let again = racyIncrement(script: script)
            #expect(first.traceHash == again.traceHash && first.choicePoints == again.choicePoints, "script \(script)")
        }
        #expect(racyIncrement(script: [0, 1]).traceHash != racyIncrement(script: [1]).traceHash, "scripts [0,1] and [1] gave one trace")
    }

    @Test func aScriptThatDoesNotFitIsReported() {
        let run = racyIncrement(script: [0, 5])
        #expect(run.violations.contains { $0.contains("does not fit") && $0.contains("option 5") }, "script [0,5]: \(run.violations)")
        #expect(run.choicePoints.map(\.taken) == [0, 0], "script [0,5]: the run must take option 0 where the script does not fit")
    }

    /// An unfenced WRITE that may pass the CAS before it is one more option: both orders
    /// are enumerated; fenced, or with reordering off, only posting order is.
    @Test func anUnfencedWritePassingIsAChoiceAndAFenceRemovesIt() {
        let unfenced = ExhaustiveExploration.enumerate("unfenced", runsMax: 10) { casThenWrite(script: $0, fenced: false, reordering: true) }
        #expect(unfenced.complete && unfenced.interleavings == 2, "\(unfenced)")
        #expect(unfenced.outcomes == ["CAS found 0": 1, "CAS found 2": 1], "\(unfenced.outcomes)")
        for (fenced, reordering) in [(true, true), (false, false)] {
            let report = ExhaustiveExploration.enumerate("in order", runsMax: 10) { casThenWrite(script: $0, fenced: fenced, reordering: reordering) }
            #expect(report.complete && report.interleavings == 1 && report.outcomes == ["CAS found 0": 1],
                    "fenced \(fenced), reordering \(reordering): \(report) \(report.outcomes)")
        }
    }

    /// A sleeping task wakes only when no verb is left: node 2 sleeps 1 ns, node 1 posts
    /// three CASes one after the other; all three execute before node 2's, in every run.
    @Test func sleepersWakeOnlyWhenNoVerbIsLeft() throws {
        let report = ExhaustiveExploration.enumerate("sleeper", runsMax: 10) { script in
            let simulator = Simulator(seed: 1, latency: LatencyModel(), exploration: .scripted(script))
            let target: (SimulatedNIC, ProtectionDomain, MemoryRegion)
            do { target = try makeTarget(node: 0) } catch {
                return ScriptedRun(simulator: simulator, violations: ["no target: \(error)"], outcome: "")
            }
            let (nic, pd, region) = target
            let busy = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
            let sleeper = nic.connect(from: NodeID(2), protectionDomain: pd, simulator: simulator)
            let errors = Locked<[String]>([])
            simulator.spawn {
                for step: UInt64 in 0..<3 {
                    do throws(FabricError) { _ = try await busy.compareAndSwap(region.address, expected: step, desired: step + 1, rkey: region.rkey) } catch {
                        errors.withLock { $0.append("node 1: \(error)") }
                    }
                }
            }
            simulator.spawn {
                await simulator.sleep(nanoseconds: 1)
                do throws(FabricError) { _ = try await sleeper.compareAndSwap(region.address, expected: 3, desired: 10, rkey: region.rkey) } catch {
                    errors.withLock { $0.append("node 2: \(error)") }
                }
            }
            simulator.run()
            return ScriptedRun(simulator: simulator, violations: errors.withLock { $0 }, outcome: "x = \(nic.peekWord(region.address)) at \(simulator.nowNanoseconds) ns")
        }
        #expect(report.complete && report.interleavings == 1 && report.choicePoints == 0, "\(report)")
        #expect(report.outcomes == ["x = 10 at 1 ns": 1] && report.violatingRuns == 0, "\(report.outcomes) \(scriptsText(report.violations))")
    }

    @Test func theRunBoundIsReported() {
        let report = ExhaustiveExploration.enumerate("bounded", runsMax: 4) { racyIncrement(script: $0) }
        #expect(!report.complete && report.runsMaxReached && report.interleavings == 4, "\(report)")
    }
}

@Suite struct ExhaustiveExplorationTests {
    /// The smallest program in full, in a debug build: every interleaving, no violation,
    /// and the exact count (a change of the engine or the protocol's verbs shows here;
    /// `finemem explore --exhaustive --program small-pair-one-span` prints the same).
    @Test func theSmallestProgramIsExploredInFullWithoutViolations() {
        let report = ExhaustiveExploration().explore(.smallPairOneSpan)
        #expect(report.complete && report.aborted == nil, "\(report)")
        #expect(report.violatingRuns == 0, "\(report)\n\(scriptsText(report.violations))")
        #expect(report.interleavings == 140 && report.choicePoints == 139 && report.deepestRun == 10, "\(report)")
        // Each node ends with a block of its own; which one depends on the order.
        #expect(report.outcomes.count == 4, "\(report.outcomes)")
    }

    /// Three more small programs in full, with their exact counts: two section-layer
    /// claims, two span openings, a section-layer free racing a span opening.
    @Test func moreSmallProgramsAreExploredInFull() {
        for (program, interleavings) in [(ExhaustiveProgram.sectionPair, 20), (.spanOpeningPair, 12), (.sectionFreeVersusSmall, 674)] {
            let report = ExhaustiveExploration().explore(program)
            #expect(report.complete && report.interleavings == interleavings, "\(program.name): \(report)")
            #expect(report.violatingRuns == 0, "\(program.name): \(report)\n\(scriptsText(report.violations))")
        }
    }

    /// The same script gives the same run, bit for bit; another script another run.
    @Test func sameScriptSameTraceHash() {
        let exploration = ExhaustiveExploration()
        let script = [1, 0, 1]
        let first = exploration.run(.smallPairOneSpan, script: script)
        let again = exploration.run(.smallPairOneSpan, script: script)
        #expect(first.violations.isEmpty, "script \(script): \(first.violations)")
        #expect(first.traceHash == again.traceHash && first.choicePoints == again.choicePoints && first.outcome == again.outcome,
                "script \(script): \(first.traceHash) then \(again.traceHash)")
        let other = exploration.run(.smallPairOneSpan, script: [])
        #expect(other.traceHash != first.traceHash, "scripts \(script) and [] gave the same trace \(first.traceHash)")
    }

    @Test func everyNamedProgramHasAUniqueNameAndTwoComputeNodes() {
        let names = ExhaustiveProgram.catalog.map(\.name)
        #expect(Set(names).count == names.count, "\(names)")
        for program in ExhaustiveProgram.catalog {
            #expect(program.concurrent.count == 2 && ExhaustiveProgram.named(program.name) == program, "\(program)")
            #expect(program.concurrent.allSatisfy { (1...3).contains($0.count) }, "\(program)")
        }
    }
}
