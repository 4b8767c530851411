import CLoLDU
import LoLDU

// The optimiser functions of include/loldu.h: validate, call the core, map errors.

let optimizers = HandleTable<Optimizer>(kind: "loldu_optimizer")

extension Check {
    static func optimizerConfig(_ pointer: UnsafePointer<loldu_optimizer_config>) throws(LoLDUError) -> OptimizerConfig {
        try structSize(pointer, "config")
        let c = pointer.pointee
        guard let kind = OptimizerConfig.Kind(rawValue: c.kind) else {
            throw .invalid("config.kind must be LOLDU_SGD (0), LOLDU_ADAM (1) or LOLDU_ADAMW (2), got \(c.kind)")
        }
        guard let schedule = OptimizerConfig.Schedule(rawValue: c.schedule) else {
            throw .invalid("config.schedule must be a loldu_schedule value in [0, 2], got \(c.schedule)")
        }
        var config = OptimizerConfig(kind: kind)
        config.lr = c.lr
        config.lrSigma = c.lr_sigma
        config.weightDecay = c.weight_decay
        config.weightDecaySigma = c.weight_decay_sigma
        config.momentum = c.momentum
        config.dampening = c.dampening
        config.nesterov = try flag(c.nesterov, "config.nesterov")
        config.schedule = schedule
        config.beta1 = c.beta1
        config.beta2 = c.beta2
        config.eps = c.eps
        config.maxGradNorm = c.max_grad_norm
        guard c.warmup_steps >= 0, c.total_steps >= 0 else {
            throw .invalid("config.warmup_steps and config.total_steps must be >= 0, got \(c.warmup_steps) and \(c.total_steps)")
        }
        config.warmupSteps = Int(c.warmup_steps)
        config.totalSteps = Int(c.total_steps)
        try config.validate()
        return config
    }

    /// `count` live adapter handles from a C array.
    static func adapterList(_ list: UnsafePointer<OpaquePointer?>?, _ count: Int) throws(LoLDUError) -> [any AnyAdapter] {
        guard count >= 1, count <= 1 << 24 else { throw .invalid("count must be in [1, \(1 << 24)], got \(UInt(bitPattern: count))") }
        let list = try nonNull(list, "adapters")
        try ensureRoom(count, bytesEach: 128)  // (up to 2^24 references in Swift collections)
        var result: [any AnyAdapter] = []
        for i in 0..<count { result.append(try adapters.get(list[i], "adapters[\(i)]")) }
        return result
    }

    /// A file or directory path: non-NULL, non-empty UTF-8.
    static func path(_ path: UnsafePointer<CChar>?, _ name: String) throws(LoLDUError) -> String {
        guard let text = String(validatingCString: try nonNull(path, name)), !text.isEmpty else {
            throw .invalid("\(name) must be a non-empty UTF-8 string")
        }
        return text
    }
}

@_cdecl("loldu_optimizer_config_default")
public func lolduOptimizerConfigDefault(_ config: UnsafeMutablePointer<loldu_optimizer_config>?, _ kind: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(config, "config")
        guard let kind = OptimizerConfig.Kind(rawValue: kind) else {
            throw .invalid("kind must be LOLDU_SGD (0), LOLDU_ADAM (1) or LOLDU_ADAMW (2), got \(kind)")
        }
        let d = OptimizerConfig(kind: kind)
        var c = loldu_optimizer_config()
        c.struct_size = UInt32(MemoryLayout<loldu_optimizer_config>.size)
        c.kind = d.kind.rawValue
        c.lr = d.lr
        c.lr_sigma = d.lrSigma
        c.weight_decay = d.weightDecay
        c.weight_decay_sigma = d.weightDecaySigma
        c.momentum = d.momentum
        c.dampening = d.dampening
        c.nesterov = d.nesterov ? 1 : 0
        c.schedule = d.schedule.rawValue
        c.beta1 = d.beta1
        c.beta2 = d.beta2
        c.eps = d.eps
        c.max_grad_norm = d.maxGradNorm
        c.warmup_steps = Int64(d.warmupSteps)
        c.total_steps = Int64(d.totalSteps)
        out.pointee = c
    }
}

@_cdecl("loldu_optimizer_create")
public func lolduOptimizerCreate(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ config: UnsafePointer<loldu_optimizer_config>?,
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int
) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let c = try Check.optimizerConfig(try Check.nonNull(config, "config"))
        let optimizer = try Optimizer(config: c, adapters: try Check.adapterList(list, count))
        out.pointee = optimizers.insert(optimizer)
    }
}

@_cdecl("loldu_optimizer_free")
public func lolduOptimizerFree(_ handle: OpaquePointer?) {
    optimizers.remove(handle)
}

@_cdecl("loldu_optimizer_step")
public func lolduOptimizerStep(_ handle: OpaquePointer?, _ norm: UnsafeMutablePointer<Double>?) -> Int32 {
    status { () throws(LoLDUError) in
        let value = try optimizers.get(handle, "optimizer").step()
        norm?.pointee = value
    }
}

@_cdecl("loldu_optimizer_zero_grad")
public func lolduOptimizerZeroGrad(_ handle: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in try optimizers.get(handle, "optimizer").zeroGrad() }
}

@_cdecl("loldu_optimizer_get_lr")
public func lolduOptimizerGetLr(_ handle: OpaquePointer?, _ lr: UnsafeMutablePointer<Double>?, _ lrSigma: UnsafeMutablePointer<Double>?) -> Int32 {
    status { () throws(LoLDUError) in
        let rates = try optimizers.get(handle, "optimizer").rates
        lr?.pointee = rates.z
        lrSigma?.pointee = rates.sigma
    }
}

@_cdecl("loldu_optimizer_get_step")
public func lolduOptimizerGetStep(_ handle: OpaquePointer?, _ steps: UnsafeMutablePointer<Int64>?) -> Int32 {
    status { () throws(LoLDUError) in
        let optimizer = try optimizers.get(handle, "optimizer")
        try Check.nonNull(steps, "steps").pointee = Int64(optimizer.steps)
    }
}

@_cdecl("loldu_optimizer_save")
public func lolduOptimizerSave(_ handle: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    status { () throws(LoLDUError) in
        try optimizers.get(handle, "optimizer").save(to: try Check.path(path, "path"))
    }
}

@_cdecl("loldu_optimizer_load")
public func lolduOptimizerLoad(_ handle: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    status { () throws(LoLDUError) in
        try optimizers.get(handle, "optimizer").load(from: try Check.path(path, "path"))
    }
}
