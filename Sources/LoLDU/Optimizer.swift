import Glibc

/// Optimiser settings; the update rules are torch.optim's (single-tensor CPU implementations).
public struct OptimizerConfig: Sendable, Equatable {
    public enum Kind: Int32, Sendable, CaseIterable {
        case sgd = 0, adam = 1, adamW = 2
        public var name: String { ["sgd", "adam", "adamw"][Int(rawValue)] }
    }

    public enum Schedule: Int32, Sendable, CaseIterable {
        case constant = 0, linear = 1, cosine = 2
        public var name: String { ["constant", "linear", "cosine"][Int(rawValue)] }
    }

    public var kind: Kind
    public var lr = 1e-3
    /// `< 0`: the same as `lr`.
    public var lrSigma = -1.0
    public var weightDecay: Double
    public var weightDecaySigma = 0.0
    public var momentum = 0.0
    public var dampening = 0.0
    public var nesterov = false
    public var schedule = Schedule.constant
    public var beta1 = 0.9, beta2 = 0.999, eps = 1e-8
    /// `> 0`: clip the global gradient norm to this first.
    public var maxGradNorm = 0.0
    public var warmupSteps = 0
    public var totalSteps = 0

    /// The largest step count: steps are exact in a `Double` (the schedule computes with them).
    static let maxSteps = 1 << 53

    /// torch.optim's defaults for `kind`.
    public init(kind: Kind) {
        self.kind = kind
        weightDecay = kind == .adamW ? 1e-2 : 0
    }

    public func validate() throws(LoLDUError) {
        func check(_ ok: Bool, _ message: String) throws(LoLDUError) {
            if !ok { throw .invalid("config.\(message)") }
        }
        try check(lr.isFinite && lr > 0, "lr must be finite and > 0, got \(lr)")
        try check(lrSigma.isFinite, "lr_sigma must be finite (< 0 means lr), got \(lrSigma)")
        try check(weightDecay.isFinite && weightDecay >= 0, "weight_decay must be finite and >= 0, got \(weightDecay)")
        try check(weightDecaySigma.isFinite && weightDecaySigma >= 0,
                  "weight_decay_sigma must be finite and >= 0, got \(weightDecaySigma)")
        try check(momentum.isFinite && momentum >= 0, "momentum must be finite and >= 0, got \(momentum)")
        try check(dampening.isFinite && dampening >= 0, "dampening must be finite and >= 0, got \(dampening)")
        try check(!nesterov || (momentum > 0 && dampening == 0), "nesterov needs momentum > 0 and dampening = 0")
        try check(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got \(beta1)")
        try check(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got \(beta2)")
        try check(eps.isFinite && eps > 0, "eps must be finite and > 0, got \(eps)")
        try check(maxGradNorm.isFinite && maxGradNorm >= 0, "max_grad_norm must be finite and >= 0 (0 = off), got \(maxGradNorm)")
        try check(warmupSteps >= 0 && warmupSteps <= OptimizerConfig.maxSteps,
                  "warmup_steps must be in [0, 2^53], got \(warmupSteps)")
        try check(totalSteps >= 0 && totalSteps <= OptimizerConfig.maxSteps, "total_steps must be in [0, 2^53], got \(totalSteps)")
        try check(schedule == .constant || totalSteps > warmupSteps,
                  "total_steps must be > warmup_steps (\(warmupSteps)) for a \(schedule.name) schedule, got \(totalSteps)")
    }

    /// The factor on the base learning rates at step `t` (0-based count of completed steps),
    /// as transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.
    public func factor(step t: Int) -> Double {
        if t < warmupSteps { return Double(t) / Double(max(1, warmupSteps)) }
        let span = Double(max(1, totalSteps - warmupSteps))
        switch schedule {
        case .constant: return 1
        case .linear: return max(0, Double(totalSteps - t) / span)
        case .cosine: return max(0, 0.5 * (1 + cos(Double.pi * Double(t - warmupSteps) / span)))
        }
    }
}

/// SGD, Adam or AdamW over the `z` and `σ` of several adapters.
public final class Optimizer: @unchecked Sendable {
    public private(set) var config: OptimizerConfig
    public let adapters: [any AnyAdapter]
    private var states: [any ParameterState]
    /// Completed steps.
    public private(set) var steps = 0

    public init(config: OptimizerConfig, adapters: [any AnyAdapter]) throws(LoLDUError) {
        try config.validate()
        guard !adapters.isEmpty else { throw .invalid("count must be >= 1") }
        var seen: [ObjectIdentifier: Int] = [:]
        for (i, adapter) in adapters.enumerated() {
            if let first = seen.updateValue(i, forKey: ObjectIdentifier(adapter)) {
                throw .invalid("adapters[\(i)] is adapters[\(first)]: an adapter listed twice would be updated twice per step")
            }
        }
        self.config = config
        self.adapters = adapters
        var states: [any ParameterState] = []
        for adapter in adapters {
            switch adapter.dtype {  // the state is in the parameter type
            case .float32, .bfloat16, .float16: states.append(try State<Float>(count: adapter.rank + 1))
            case .float64: states.append(try State<Double>(count: adapter.rank + 1))
            }
        }
        self.states = states
    }

    /// The learning rates of `z` and `σ` for the next step.
    public var rates: (z: Double, sigma: Double) {
        let f = config.factor(step: steps)
        return (config.lr * f, (config.lrSigma < 0 ? config.lr : config.lrSigma) * f)
    }

    /// The number of trainable values of adapter `i` (z, then σ if trained).
    private func trainable(_ i: Int) -> Int { adapters[i].trainableCount }

    /// One step; returns the global gradient norm before clipping.
    ///
    /// All or nothing: if a new value would not be finite (or would make `σ z − σ₀ z_ref`
    /// overflow), every parameter, gradient and state buffer is restored and the step count is
    /// unchanged, and the error names the adapter and the value.
    public func step() throws(LoLDUError) -> Double {
        for adapter in adapters { try adapter.checkUsable() }
        for (i, adapter) in adapters.enumerated() where adapter.merged {
            throw .state("adapter \(i) is merged; unmerge it before training")
        }
        guard steps < OptimizerConfig.maxSteps else {
            throw .state("the optimiser has taken \(steps) steps, the most it counts")
        }
        var grads: [UnsafeMutableRawPointer] = []
        for adapter in adapters { grads.append(try adapter.gradsPointer()) }
        func globalNorm(dividedBy divisor: Double) -> Double {
            var sum = 0.0
            for (i, state) in states.enumerated() { sum += state.sumOfSquares(grads[i], count: trainable(i), dividedBy: divisor) }
            return divisor * sum.squareRoot()
        }
        var norm = globalNorm(dividedBy: 1)
        if norm == .infinity {  // finite gradients whose squares overflow (float64): scaled, as BLAS nrm2
            let largest = states.indices.map { states[$0].largestMagnitude(grads[$0], count: trainable($0)) }.max() ?? 0
            if largest.isFinite { norm = globalNorm(dividedBy: largest) }
        }
        guard norm.isFinite else {
            throw LoLDUError(.notFinite, "a gradient is NaN or infinite (global norm \(norm)); no parameter was updated")
        }
        let saved = adapters.indices.map { Snapshot(adapters[$0], grads: grads[$0], states[$0]) }
        if config.maxGradNorm > 0 {
            // torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
            let scale = min(1, config.maxGradNorm / (norm + 1e-6))
            for (i, state) in states.enumerated() { state.scale(grads[i], count: trainable(i), by: scale) }
        }
        let (lr, lrSigma) = rates
        for (i, state) in states.enumerated() {
            let adapter = adapters[i]
            state.update(params: adapter.paramsPointer, grads: grads[i], rank: adapter.rank,
                         trainSigma: adapter.config.trainSigma, config: config, step: steps + 1, lr: lr, lrSigma: lrSigma)
        }
        for (i, adapter) in adapters.enumerated() {
            // The state first: an overflowing state (a squared gradient past the type's range)
            // is the cause when a parameter then overflows too.
            let cause: String
            if let (state, k) = states[i].firstNonFiniteValue {
                let of = k < adapter.rank ? "z[\(k)]" : "sigma"
                let advice = config.maxGradNorm > 0 ? "" : ": clip them, e.g. max_grad_norm"
                cause = "the optimiser's \(state) of \(of) not finite (gradients too large for \(adapter.dtype.parameterType.name)\(advice))"
            } else if let bad = adapter.firstNonFiniteParameter {
                cause = "\(bad) not finite (learning rate \(lr) too large?)"
            } else {
                continue
            }
            for snapshot in saved { snapshot.restore() }
            throw LoLDUError(.notFinite, "adapters[\(i)]: this step would make \(cause); nothing was changed")
        }
        steps += 1
        return norm
    }

    public func zeroGrad() {
        for adapter in adapters { adapter.zeroGrad() }
    }

    // MARK: Saving and restoring

    private static let format = "loldu-optimizer"

    static func metadata(_ c: OptimizerConfig) -> [String: String] {
        [
            "kind": c.kind.name, "lr": c.lr.description, "lr_sigma": c.lrSigma.description,
            "weight_decay": c.weightDecay.description, "weight_decay_sigma": c.weightDecaySigma.description,
            "momentum": c.momentum.description, "dampening": c.dampening.description,
            "nesterov": c.nesterov ? "1" : "0", "schedule": c.schedule.name, "beta1": c.beta1.description,
            "beta2": c.beta2.description, "eps": c.eps.description, "max_grad_norm": c.maxGradNorm.description,
            "warmup_steps": String(c.warmupSteps), "total_steps": String(c.totalSteps),
        ]
    }

    /// Writes steps, configuration and every state buffer to a safetensors file, atomically.
    public func save(to path: String) throws(LoLDUError) {
        var metadata = Self.metadata(config)
        metadata["format"] = Self.format
        metadata["loldu.version"] = libraryVersion
        metadata["steps"] = String(steps)
        metadata["adapters"] = String(adapters.count)
        var entries: [SafeTensors.Entry] = []
        for (i, state) in states.enumerated() {
            metadata["adapter.\(i).initialized"] = state.initialized ? "1" : "0"
            metadata["adapter.\(i).dtype"] = adapters[i].dtype.parameterType.name
            metadata["adapter.\(i).rank"] = String(adapters[i].rank)
            for (k, buffer) in state.buffers.enumerated() {
                let bytes = UnsafeRawBufferPointer(buffer)
                entries.append(.init(name: "adapter.\(i).\(State<Float>.names[k])", dtype: SafeTensors.name(of: adapters[i].dtype.parameterType),
                                     shape: [adapters[i].rank + 1]) { out in out.copyMemory(from: bytes) })
            }
        }
        try SafeTensors.write(entries, metadata: metadata, to: path)
    }

    /// Restores what ``save(to:)`` wrote, for the same configuration and adapters (count, ranks,
    /// dtypes); anything else is `mismatch`, and nothing changes.
    public func load(from path: String) throws(LoLDUError) {
        try load(try AtomicFile.read(path, limit: 1 << 30), what: path)
    }

    /// ``load(from:)`` from the bytes of a file; `what` names it in messages. Every value read
    /// is range-checked before anything changes.
    func load(_ bytes: any ByteSource, what path: String) throws(LoLDUError) {
        let file = try SafeTensors.parse(bytes, what: path)
        let meta = file.metadata
        guard meta["format"] == Self.format else { throw file.fail("not an optimiser state (format is not \"\(Self.format)\")") }
        guard meta["adapters"] == String(adapters.count) else {
            throw LoLDUError(.mismatch, "\(path): saved for \(meta["adapters"] ?? "?") adapters, this optimiser has \(adapters.count)")
        }
        func number(_ key: String) throws(LoLDUError) -> Double {
            guard let v = meta[key].flatMap(Double.init), v.isFinite else { throw file.fail("__metadata__[\"\(key)\"] is missing or invalid") }
            return v
        }
        func integer(_ key: String) throws(LoLDUError) -> Int {
            guard let v = meta[key].flatMap({ Int($0) }), v >= 0, v <= OptimizerConfig.maxSteps else {
                throw file.fail("__metadata__[\"\(key)\"] must be an integer in [0, 2^53], got \(meta[key].map { "\"\($0)\"" } ?? "nothing")")
            }
            return v
        }
        guard let kind = OptimizerConfig.Kind.allCases.first(where: { $0.name == meta["kind"] }),
              let schedule = OptimizerConfig.Schedule.allCases.first(where: { $0.name == meta["schedule"] })
        else { throw file.fail("unknown optimiser kind or schedule") }
        var c = config
        c.kind = kind
        c.lr = try number("lr"); c.lrSigma = try number("lr_sigma")
        c.weightDecay = try number("weight_decay"); c.weightDecaySigma = try number("weight_decay_sigma")
        c.momentum = try number("momentum"); c.dampening = try number("dampening")
        c.nesterov = meta["nesterov"] == "1"; c.schedule = schedule
        c.beta1 = try number("beta1"); c.beta2 = try number("beta2"); c.eps = try number("eps")
        c.maxGradNorm = try number("max_grad_norm")
        c.warmupSteps = try integer("warmup_steps"); c.totalSteps = try integer("total_steps")
        let differences = Self.metadata(c).filter { Self.metadata(config)[$0.key] != $0.value }.map(\.key).sorted()
        guard differences.isEmpty else {
            throw LoLDUError(.mismatch, "\(path) was saved with another configuration (\(differences.joined(separator: ", "))); create the optimiser with the saved configuration to resume")
        }
        let savedSteps = try integer("steps")
        var restored: [(state: any ParameterState, values: [[Double]], initialized: Bool)] = []
        for (i, state) in states.enumerated() {
            let adapter = adapters[i]
            let first = "adapter.\(i).\(State<Float>.names[0])"
            guard let tensor = file.tensors[first] else { throw file.fail("missing tensor \"\(first)\"") }
            let savedDtype = meta["adapter.\(i).dtype"] ?? SafeTensors.dtype(named: tensor.dtype)?.name ?? tensor.dtype
            guard savedDtype == adapter.dtype.parameterType.name else {
                throw LoLDUError(.mismatch, "\(path): adapters[\(i)] was saved with \(savedDtype) parameters, this optimiser's has \(adapter.dtype.parameterType.name) parameters")
            }
            let savedRank = meta["adapter.\(i).rank"].flatMap { Int($0) } ?? (tensor.shape.count == 1 ? tensor.shape[0] - 1 : -1)
            guard savedRank == adapter.rank else {
                throw LoLDUError(.mismatch, "\(path): adapters[\(i)] was saved with rank \(savedRank), this optimiser's has rank \(adapter.rank)")
            }
            let shape = [adapter.rank + 1]
            var values: [[Double]] = []
            for name in State<Float>.names {
                let key = "adapter.\(i).\(name)"
                values.append(try file.values(key, shape: shape, as: adapter.dtype.parameterType).array)  // (rank + 1 values)
                // A second moment is a running mean of squares: a negative one has no square root.
                if name == "exp_avg_sq", let bad = values.last!.firstIndex(where: { $0 < 0 }) {
                    throw file.fail("tensor \"\(key)\" element \(bad) is \(values.last![bad]); a second moment is never negative")
                }
            }
            restored.append((state, values, meta["adapter.\(i).initialized"] == "1"))
        }
        // Everything validated: now change state.
        for entry in restored { entry.state.restore(entry.values, initialized: entry.initialized) }
        config = c
        steps = savedSteps
    }
}

/// The bytes a step changes in one adapter (parameters, gradients) and its optimiser state, to
/// undo a step that would leave a value that is not finite.
private struct Snapshot {
    let copies: [(target: UnsafeMutableRawPointer, bytes: [UInt8])]
    let state: any ParameterState
    let initialized: Bool

    init(_ adapter: any AnyAdapter, grads: UnsafeMutableRawPointer, _ state: any ParameterState) {
        let size = (adapter.rank + 1) * adapter.dtype.parameterType.byteSize
        var copies: [(target: UnsafeMutableRawPointer, bytes: [UInt8])] = [adapter.paramsPointer, grads].map { pointer in
            (target: pointer, bytes: Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(pointer), count: size)))
        }
        for buffer in state.buffers {
            copies.append((UnsafeMutableRawPointer(mutating: buffer.baseAddress!), Array(buffer)))
        }
        self.copies = copies
        self.state = state
        initialized = state.initialized
    }

    func restore() {
        for copy in copies { copy.bytes.withUnsafeBytes { copy.target.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        state.initialized = initialized
    }
}

/// Per-adapter optimiser state: `momentum` (SGD), `exp_avg`, `exp_avg_sq` (Adam), over `r + 1`.
protocol ParameterState: AnyObject {
    var buffers: [UnsafeBufferPointer<UInt8>] { get }
    var initialized: Bool { get set }
    /// `Σ (g / divisor)²`, in double.
    func sumOfSquares(_ grads: UnsafeMutableRawPointer, count: Int, dividedBy divisor: Double) -> Double
    /// `max |g|` (NaN if a value is NaN).
    func largestMagnitude(_ grads: UnsafeMutableRawPointer, count: Int) -> Double
    func scale(_ grads: UnsafeMutableRawPointer, count: Int, by factor: Double)
    func update(params: UnsafeMutableRawPointer, grads: UnsafeMutableRawPointer, rank: Int, trainSigma: Bool,
                config: OptimizerConfig, step: Int, lr: Double, lrSigma: Double)
    func restore(_ values: [[Double]], initialized: Bool)
    /// The first state value that is not finite: its buffer's name and index, if any.
    var firstNonFiniteValue: (state: String, index: Int)? { get }
}

final class State<T: BLASScalar>: ParameterState {
    static var names: [String] { ["momentum_buffer", "exp_avg", "exp_avg_sq"] }
    let momentum: HeapBuffer<T>, expAvg: HeapBuffer<T>, expAvgSq: HeapBuffer<T>
    /// torch creates the momentum buffer at the first step.
    var initialized = false

    init(count: Int) throws(LoLDUError) {
        momentum = try HeapBuffer(zeros: count)
        expAvg = try HeapBuffer(zeros: count)
        expAvgSq = try HeapBuffer(zeros: count)
    }

    var buffers: [UnsafeBufferPointer<UInt8>] {
        [momentum, expAvg, expAvgSq].map {
            UnsafeBufferPointer(start: UnsafeRawPointer($0.pointer).assumingMemoryBound(to: UInt8.self),
                                count: $0.count * MemoryLayout<T>.stride)
        }
    }

    func sumOfSquares(_ grads: UnsafeMutableRawPointer, count: Int, dividedBy divisor: Double) -> Double {
        let g = grads.assumingMemoryBound(to: T.self)
        var sum = 0.0
        for k in 0..<count {
            let v = Double(g[k]) / divisor  // (exact when divisor = 1)
            sum += v * v
        }
        return sum
    }

    func largestMagnitude(_ grads: UnsafeMutableRawPointer, count: Int) -> Double {
        let g = grads.assumingMemoryBound(to: T.self)
        var largest = 0.0
        for k in 0..<count {
            let v = abs(Double(g[k]))
            if v.isNaN { return v }
            largest = max(largest, v)
        }
        return largest
    }

    func scale(_ grads: UnsafeMutableRawPointer, count: Int, by factor: Double) {
        let g = grads.assumingMemoryBound(to: T.self), f = T(factor)
        for k in 0..<count { g[k] *= f }
    }

    var firstNonFiniteValue: (state: String, index: Int)? {
        for (name, buffer) in zip(Self.names, [momentum, expAvg, expAvgSq]) {
            for k in 0..<buffer.count where !buffer.pointer[k].isFinite { return (name, k) }
        }
        return nil
    }

    func restore(_ values: [[Double]], initialized: Bool) {
        for (buffer, source) in zip([momentum, expAvg, expAvgSq], values) {
            for k in 0..<buffer.count { buffer.pointer[k] = T(source[k]) }
        }
        self.initialized = initialized
    }

    /// torch.optim's single-tensor update of one parameter tensor (`z`, or `σ`) at index range.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    func update(params: UnsafeMutableRawPointer, grads: UnsafeMutableRawPointer, rank: Int, trainSigma: Bool,
                config c: OptimizerConfig, step: Int, lr: Double, lrSigma: Double) {
        let p = params.assumingMemoryBound(to: T.self), g = grads.assumingMemoryBound(to: T.self)
        let groups = [(0..<rank, lr, c.weightDecay)] + (trainSigma ? [(rank..<(rank + 1), lrSigma, c.weightDecaySigma)] : [])
        let buf = momentum.pointer, m = expAvg.pointer, v = expAvgSq.pointer
        for (range, lr, wd) in groups {
            switch c.kind {
            case .sgd:
                for k in range {
                    var d = g[k]
                    if wd != 0 { d = d + T(wd) * p[k] }
                    if c.momentum != 0 {
                        if initialized {
                            buf[k] = buf[k] * T(c.momentum) + T(1 - c.dampening) * d
                        } else {
                            buf[k] = d
                        }
                        d = c.nesterov ? d + T(c.momentum) * buf[k] : buf[k]
                    }
                    p[k] = p[k] + T(-lr) * d
                }
            case .adam, .adamW:
                let bias1 = 1 - pow(c.beta1, Double(step)), bias2 = 1 - pow(c.beta2, Double(step))
                let stepSize = T(-(lr / bias1)), bias2Root = T(bias2.squareRoot())
                let weight = T(1 - c.beta1), decay = T(1 - lr * wd)
                for k in range {
                    var d = g[k]
                    if wd != 0 {
                        if c.kind == .adamW { p[k] = p[k] * decay } else { d = d + T(wd) * p[k] }
                    }
                    // exp_avg.lerp_(grad, 1 − β₁), as torch's lerp kernel computes it.
                    m[k] = weight < 0.5 ? m[k] + weight * (d - m[k]) : d - (d - m[k]) * (1 - weight)
                    v[k] = v[k] * T(c.beta2) + T(1 - c.beta2) * d * d
                    let denominator = v[k].squareRoot() / bias2Root + T(c.eps)
                    p[k] = p[k] + stepSize * m[k] / denominator
                }
            }
        }
        initialized = true
    }
}
