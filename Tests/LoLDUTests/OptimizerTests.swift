import CLoLDU
import Foundation
import Testing

/// The optimisers against their written-out torch.optim definitions, schedules, clipping, and
/// bit-identical resume.
@Suite struct OptimizerTests {
    /// A written-out reference optimiser over one parameter vector, in Double.
    struct Reference {
        var kind: loldu_optimizer_kind
        var momentum = 0.0, dampening = 0.0, nesterov = false, weightDecay = 0.0
        var beta1 = 0.9, beta2 = 0.999, eps = 1e-8
        var buffer: [Double]? = nil
        var m: [Double], v: [Double]

        init(kind: loldu_optimizer_kind, count: Int) {
            self.kind = kind
            m = Array(repeating: 0, count: count)
            v = Array(repeating: 0, count: count)
        }

        /// torch.optim.SGD / Adam / AdamW, step `t` (1-based), learning rate `lr`.
        mutating func step(_ p: inout [Double], _ g: [Double], t: Int, lr: Double) {
            switch kind {
            case LOLDU_SGD:
                var d = zip(g, p).map { $0 + weightDecay * $1 }
                if momentum != 0 {
                    if let b = buffer {
                        buffer = zip(b, d).map { momentum * $0 + (1 - dampening) * $1 }
                    } else {
                        buffer = d
                    }
                    d = nesterov ? zip(d, buffer!).map { $0 + momentum * $1 } : buffer!
                }
                p = zip(p, d).map { $0 - lr * $1 }
            default:
                var d = g
                if kind == LOLDU_ADAMW {
                    p = p.map { $0 * (1 - lr * weightDecay) }
                } else {
                    d = zip(g, p).map { $0 + weightDecay * $1 }
                }
                m = zip(m, d).map { beta1 * $0 + (1 - beta1) * $1 }
                v = zip(v, d).map { beta2 * $0 + (1 - beta2) * $1 * $1 }
                let c1 = 1 - pow(beta1, Double(t)), c2 = 1 - pow(beta2, Double(t))
                for k in p.indices { p[k] -= lr / c1 * m[k] / ((v[k] / c2).squareRoot() + eps) }
            }
        }
    }

    static func schedule(_ kind: loldu_schedule, t: Int, warmup: Int, total: Int) -> Double {
        if t < warmup { return Double(t) / Double(warmup) }
        switch kind {
        case LOLDU_SCHEDULE_LINEAR: return max(0, Double(total - t) / Double(total - warmup))
        case LOLDU_SCHEDULE_COSINE: return max(0, 0.5 * (1 + cos(Double.pi * Double(t - warmup) / Double(total - warmup))))
        default: return 1
        }
    }

    struct Setting: CustomStringConvertible, Sendable {
        let kind: loldu_optimizer_kind
        let schedule: loldu_schedule
        let momentum: Double, dampening: Double, nesterov: Bool, weightDecay: Double
        let clip: Double
        var description: String {
            "kind \(kind.rawValue) schedule \(schedule.rawValue) momentum \(momentum) nesterov \(nesterov) wd \(weightDecay) clip \(clip)"
        }
    }

    static let settings: [Setting] = [
        Setting(kind: LOLDU_SGD, schedule: LOLDU_SCHEDULE_CONSTANT, momentum: 0, dampening: 0, nesterov: false, weightDecay: 0, clip: 0),
        Setting(kind: LOLDU_SGD, schedule: LOLDU_SCHEDULE_LINEAR, momentum: 0.9, dampening: 0.1, nesterov: false, weightDecay: 0.01, clip: 0),
        Setting(kind: LOLDU_SGD, schedule: LOLDU_SCHEDULE_COSINE, momentum: 0.8, dampening: 0, nesterov: true, weightDecay: 0.05, clip: 0.5),
        Setting(kind: LOLDU_ADAM, schedule: LOLDU_SCHEDULE_CONSTANT, momentum: 0, dampening: 0, nesterov: false, weightDecay: 0.02, clip: 0),
        Setting(kind: LOLDU_ADAM, schedule: LOLDU_SCHEDULE_COSINE, momentum: 0, dampening: 0, nesterov: false, weightDecay: 0, clip: 0.3),
        Setting(kind: LOLDU_ADAMW, schedule: LOLDU_SCHEDULE_LINEAR, momentum: 0, dampening: 0, nesterov: false, weightDecay: 0.1, clip: 0),
        Setting(kind: LOLDU_ADAMW, schedule: LOLDU_SCHEDULE_CONSTANT, momentum: 0, dampening: 0, nesterov: false, weightDecay: 0.01, clip: 1.0),
    ]

    @Test(arguments: settings)
    func stepsFollowTheWrittenOutRules(_ s: Setting) throws {
        try check(Double.self, tolerance: 1e-12)
        try check(Float.self, tolerance: 2e-5)

        func check<T: TestScalar>(_: T.Type, tolerance: Double) throws {
            var random = TestRandom(71)
            let steps = 40, warmup = 5, lr = 0.05, lrSigma = 0.01
            // Two adapters: rank 4 with a trained σ, rank 3 with a fixed σ.
            let a = try TestAdapter<T>(m: 6, n: 5, weight: random.array(30)) { $0.rank = 4 }
            let b = try TestAdapter<T>(m: 4, n: 7, weight: random.array(28)) { $0.rank = 3; $0.train_sigma = 0 }
            var config = loldu_optimizer_config()
            #expect(loldu_optimizer_config_default(&config, s.kind) == LOLDU_OK)
            config.lr = lr
            config.lr_sigma = lrSigma
            config.momentum = s.momentum
            config.dampening = s.dampening
            config.nesterov = s.nesterov ? 1 : 0
            config.weight_decay = s.weightDecay
            config.weight_decay_sigma = s.weightDecay / 2
            config.max_grad_norm = s.clip
            config.schedule = s.schedule.i32
            config.warmup_steps = Int64(warmup)
            config.total_steps = Int64(steps)
            var optimizer: OpaquePointer?
            let handles: [OpaquePointer?] = [a.handle, b.handle]
            #expect(loldu_optimizer_create(&optimizer, &config, handles, 2) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            defer { loldu_optimizer_free(optimizer) }

            // Reference state: z and σ of each adapter are separate parameters (torch groups).
            var params: [[Double]] = [a.z.map(Double.init), [a.sigma], b.z.map(Double.init)]
            let fixedSigma = b.sigma
            var refs = params.map { p -> Reference in
                var r = Reference(kind: s.kind, count: p.count)
                r.momentum = s.momentum; r.dampening = s.dampening; r.nesterov = s.nesterov
                return r
            }
            refs[0].weightDecay = s.weightDecay
            refs[1].weightDecay = s.weightDecay / 2
            refs[2].weightDecay = s.weightDecay

            for t in 0..<steps {
                // Gradients written straight into the adapters' buffers.
                var grads: [[Double]] = params.map { p in p.map { _ in random.symmetric() * 3 } }
                for (adapter, z, sigma) in [(a, 0, 1), (b, 2, -1)] {
                    var g: UnsafeMutableRawPointer?
                    #expect(loldu_params(adapter.handle, nil, &g) == LOLDU_OK)
                    let gp = g!.assumingMemoryBound(to: T.self)
                    for k in 0..<adapter.rank { gp[k] = T(grads[z][k]); grads[z][k] = Double(gp[k]) }
                    if sigma >= 0 { gp[adapter.rank] = T(grads[sigma][0]); grads[sigma][0] = Double(gp[adapter.rank]) }
                }
                let norm = grads.joined().reduce(0) { $0 + $1 * $1 }.squareRoot()
                if s.clip > 0 {
                    let scale = min(1, s.clip / (norm + 1e-6))
                    grads = grads.map { $0.map { $0 * scale } }
                }
                var lrs = (0.0, 0.0)
                #expect(loldu_optimizer_get_lr(optimizer, &lrs.0, &lrs.1) == LOLDU_OK)
                let factor = Self.schedule(s.schedule, t: t, warmup: warmup, total: steps)
                expectClose([lrs.0, lrs.1], [lr * factor, lrSigma * factor], rtol: 1e-14, atol: 0, "\(s) step \(t): lr")
                var reported = 0.0
                #expect(loldu_optimizer_step(optimizer, &reported) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
                expectClose([reported], [norm], rtol: 1e-6, atol: 0, "\(s) step \(t): norm")
                refs[0].step(&params[0], grads[0], t: t + 1, lr: lr * factor)
                refs[1].step(&params[1], grads[1], t: t + 1, lr: lrSigma * factor)
                refs[2].step(&params[2], grads[2], t: t + 1, lr: lr * factor)
                #expect(loldu_optimizer_zero_grad(optimizer) == LOLDU_OK)
            }
            let what = "\(T.self) \(s)"
            expectClose(a.z, params[0], rtol: tolerance, atol: tolerance, "\(what): z of adapter 0")
            expectClose([a.sigma], params[1], rtol: tolerance, atol: tolerance, "\(what): σ of adapter 0")
            expectClose(b.z, params[2], rtol: tolerance, atol: tolerance, "\(what): z of adapter 1")
            #expect(b.sigma == fixedSigma, "\(what): an untrained σ does not move")
            var steps64: Int64 = 0
            #expect(loldu_optimizer_get_step(optimizer, &steps64) == LOLDU_OK && steps64 == Int64(steps))
        }
    }

    @Test func nonFiniteGradientUpdatesNothing() throws {
        var random = TestRandom(73)
        let a = try TestAdapter<Float>(m: 5, n: 4, weight: random.array(20)) { $0.rank = 3 }
        var config = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&config, LOLDU_ADAMW)
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &config, [a.handle], 1) == LOLDU_OK)
        defer { loldu_optimizer_free(optimizer) }
        var g: UnsafeMutableRawPointer?
        _ = loldu_params(a.handle, nil, &g)
        g!.assumingMemoryBound(to: Float.self)[1] = .nan
        let before = a.z
        #expect(loldu_optimizer_step(optimizer, nil) == LOLDU_ERR_NOT_FINITE)
        #expect(a.z == before)
        // Finite gradients whose squares overflow float32: the step would leave exp_avg_sq
        // infinite (and a state file that no load accepts), so it is refused as a whole.
        for k in 0..<4 { g!.assumingMemoryBound(to: Float.self)[k] = 1e30 }
        var steps: Int64 = -1
        #expect(loldu_optimizer_step(optimizer, nil) == LOLDU_ERR_NOT_FINITE)
        #expect(String(cString: loldu_last_error()).contains("exp_avg_sq of z[0]"), "\(String(cString: loldu_last_error()))")
        #expect(a.z == before && loldu_optimizer_get_step(optimizer, &steps) == LOLDU_OK && steps == 0)
        for k in 0..<4 { g!.assumingMemoryBound(to: Float.self)[k] = 1 }
        #expect(loldu_optimizer_step(optimizer, nil) == LOLDU_OK)
        let directory = try temporaryDirectory()
        var reloaded: OpaquePointer?
        #expect(loldu_optimizer_create(&reloaded, &config, [a.handle], 1) == LOLDU_OK)
        defer { loldu_optimizer_free(reloaded) }
        #expect(loldu_optimizer_save(optimizer, "\(directory)/state.safetensors") == LOLDU_OK)
        #expect(loldu_optimizer_load(reloaded, "\(directory)/state.safetensors") == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        #expect(loldu_merge(a.handle) == LOLDU_OK)
        _ = loldu_optimizer_zero_grad(optimizer)
        #expect(loldu_optimizer_step(optimizer, nil) == LOLDU_ERR_STATE)
        #expect(String(cString: loldu_last_error()).contains("merged"))
    }

    /// Finite float64 gradients whose squares overflow double: their global norm is computed
    /// scaled (as BLAS nrm2), so SGD steps and clipping work instead of calling them infinite.
    @Test func float64GradientsBeyondTheSquareRootOfDoubleMaxStep() throws {
        let a = try TestAdapter<Double>(m: 3, n: 3, weight: [2, 1, 0, 1, 3, 1, 0, 1, 4]) { $0.rank = 2 }
        for clip in [0.0, 1.0] {
            var config = loldu_optimizer_config()
            _ = loldu_optimizer_config_default(&config, LOLDU_SGD)
            config.lr = 1e-200
            config.max_grad_norm = clip
            var optimizer: OpaquePointer?
            #expect(loldu_optimizer_create(&optimizer, &config, [a.handle], 1) == LOLDU_OK)
            defer { loldu_optimizer_free(optimizer) }
            var g: UnsafeMutableRawPointer?
            _ = loldu_params(a.handle, nil, &g)
            let grads = g!.assumingMemoryBound(to: Double.self)
            grads[0] = 3e160
            grads[1] = 4e160
            a.z = clip > 0 ? [1e-199, 1e-199] : [1e-39, 1e-39]  // (where a step of lr g shows)
            let before = a.z
            var norm = 0.0
            #expect(loldu_optimizer_step(optimizer, &norm) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            #expect(abs(norm - 5e160) <= 1e-15 * 5e160)
            // SGD: z −= lr g, with g scaled to norm 1 when clipped.
            let expected = clip > 0 ? [0.6e-200, 0.8e-200] : [3e-40, 4e-40]
            for k in 0..<2 { #expect(abs(before[k] - expected[k] - a.z[k]) <= 1e-15 * before[k]) }
            a.zeroGrad()
        }
    }

    @Test func badConfigurationsAreRefused() throws {
        var random = TestRandom(79)
        let a = try TestAdapter<Float>(m: 5, n: 4, weight: random.array(20)) { $0.rank = 3 }
        let cases: [(String, (inout loldu_optimizer_config) -> Void)] = [
            ("config.lr", { $0.lr = 0 }),
            ("config.lr", { $0.lr = .nan }),
            ("config.beta1", { $0.beta1 = 1 }),
            ("config.beta2", { $0.beta2 = -0.1 }),
            ("config.nesterov", { $0.nesterov = 1 }),
            ("config.total_steps", { $0.schedule = LOLDU_SCHEDULE_LINEAR.i32; $0.warmup_steps = 10; $0.total_steps = 10 }),
            ("config.schedule", { $0.schedule = 7 }),
            ("config.kind", { $0.kind = 9 }),
            ("config.struct_size", { $0.struct_size = 4 }),
            ("config.weight_decay", { $0.weight_decay = -1 }),
            ("config.max_grad_norm", { $0.max_grad_norm = .infinity }),
        ]
        for (mention, edit) in cases {
            var config = loldu_optimizer_config()
            _ = loldu_optimizer_config_default(&config, LOLDU_SGD)
            edit(&config)
            var optimizer: OpaquePointer?
            #expect(loldu_optimizer_create(&optimizer, &config, [a.handle], 1) == LOLDU_ERR_INVALID_ARGUMENT, "\(mention)")
            #expect(String(cString: loldu_last_error()).contains(mention), "\(String(cString: loldu_last_error()))")
            #expect(optimizer == nil)
        }
        var config = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&config, LOLDU_SGD)
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &config, [a.handle], 0) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(loldu_optimizer_create(&optimizer, &config, [a.handle, a.handle], 2) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(String(cString: loldu_last_error()).contains("adapters[1] is adapters[0]"))
        #expect(loldu_optimizer_create(&optimizer, &config, [nil], 1) == LOLDU_ERR_NULL_POINTER)
        #expect(String(cString: loldu_last_error()).contains("adapters[0]"))
        #expect(loldu_optimizer_step(nil, nil) == LOLDU_ERR_NULL_POINTER)
    }

    /// A small regression problem trained through the C ABI: returns the final z and outputs.
    static func train(
        steps: Int, stopAt: Int? = nil, resumeFrom directory: String? = nil, saveTo saveDirectory: String? = nil
    ) throws -> (z: [Float], y: [Float]) {
        var random = TestRandom(83)
        let (m, n, r, batch) = (12, 9, 5, 16)
        let w: [Float] = random.array(m * n), b: [Float] = random.array(m)
        let x: [Float] = random.array(batch * n), target: [Float] = random.array(batch * m)
        let adapter = try TestAdapter<Float>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r); $0.z_init = LOLDU_INIT_S_NORMAL.i32; $0.seed = 5 }
        var config = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&config, LOLDU_ADAMW)
        config.lr = 0.01
        config.schedule = LOLDU_SCHEDULE_LINEAR.i32
        config.warmup_steps = 3
        config.total_steps = Int64(steps)
        config.max_grad_norm = 1
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &config, [adapter.handle], 1) == LOLDU_OK)
        defer { loldu_optimizer_free(optimizer) }
        var start = 0
        if let directory {
            var checkpoint: OpaquePointer?
            #expect(loldu_checkpoint_open(&checkpoint, directory) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            #expect(loldu_checkpoint_apply(checkpoint, "layer", adapter.handle) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            loldu_checkpoint_free(checkpoint)
            #expect(loldu_optimizer_load(optimizer, directory + "/optimizer.safetensors") == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            var done: Int64 = 0
            _ = loldu_optimizer_get_step(optimizer, &done)
            start = Int(done)
        }
        for t in start..<(stopAt ?? steps) {
            _ = t
            let y = adapter.forward(x, batch: batch)
            adapter.backward(x, zip(y, target).map { $0 - $1 }, batch: batch)
            #expect(loldu_optimizer_step(optimizer, nil) == LOLDU_OK)
            #expect(loldu_optimizer_zero_grad(optimizer) == LOLDU_OK)
        }
        if let saveDirectory {
            let saved = withCStrings(["layer"]) { loldu_checkpoint_save(saveDirectory, [adapter.handle], $0, 1) }
            #expect(saved == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            #expect(loldu_optimizer_save(optimizer, saveDirectory + "/optimizer.safetensors") == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        }
        return (adapter.z, adapter.forward(x, batch: batch))
    }

    @Test func resumedRunIsBitIdentical() throws {
        let directory = try temporaryDirectory()
        let straight = try Self.train(steps: 30)
        let halfway = try Self.train(steps: 30, stopAt: 13, saveTo: directory)
        #expect(halfway.z != straight.z)
        let resumed = try Self.train(steps: 30, resumeFrom: directory)
        #expect(resumed.z == straight.z, "z after resume")
        #expect(resumed.y == straight.y, "outputs after resume")
    }

    @Test func optimizerStateFromAnotherSetupIsRefused() throws {
        let directory = try temporaryDirectory()
        _ = try Self.train(steps: 10, stopAt: 2, saveTo: directory)
        var random = TestRandom(89)
        let a = try TestAdapter<Float>(m: 5, n: 4, weight: random.array(20)) { $0.rank = 3 }
        let b = try TestAdapter<Float>(m: 5, n: 4, weight: random.array(20)) { $0.rank = 3 }
        var config = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&config, LOLDU_ADAMW)
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &config, [a.handle, b.handle], 2) == LOLDU_OK)
        defer { loldu_optimizer_free(optimizer) }
        #expect(loldu_optimizer_load(optimizer, directory + "/optimizer.safetensors") == LOLDU_ERR_MISMATCH)
        // The same adapters but another learning rate: refused, nothing changed.
        var other = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&other, LOLDU_ADAMW)
        other.lr = 0.02
        other.schedule = LOLDU_SCHEDULE_LINEAR.i32
        other.warmup_steps = 3
        other.total_steps = 10
        other.max_grad_norm = 1
        var single: OpaquePointer?
        #expect(loldu_optimizer_create(&single, &other, [a.handle], 1) == LOLDU_OK)
        defer { loldu_optimizer_free(single) }
        #expect(loldu_optimizer_load(single, directory + "/optimizer.safetensors") == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("lr"), "\(String(cString: loldu_last_error()))")
        var steps: Int64 = -1
        #expect(loldu_optimizer_get_step(single, &steps) == LOLDU_OK && steps == 0)
        #expect(loldu_optimizer_load(optimizer, directory + "/adapter_model.safetensors") == LOLDU_ERR_FORMAT)
        #expect(loldu_optimizer_load(optimizer, directory + "/missing") == LOLDU_ERR_IO)
    }
}
