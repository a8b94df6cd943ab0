// The log-flush fuzz target (see FuzzTargets.flushFindings for the input format).
import FuzzTargets

runFuzzer(name: "fuzz-flush", fuzzFlush)
