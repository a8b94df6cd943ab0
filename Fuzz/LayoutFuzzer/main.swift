// The layout fuzz target (see FuzzTargets.fuzzLayout).
import FuzzTargets

runFuzzer(name: "fuzz-layout", fuzzLayout)
