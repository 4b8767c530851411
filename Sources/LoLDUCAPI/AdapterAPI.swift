import CLoLDU
import LoLDU

// The adapter functions of include/loldu.h: validate, call the core, map errors. Nothing else.

@_cdecl("loldu_adapter_create")
public func lolduAdapterCreate(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ dtypeRaw: Int32, _ m64: Int64, _ n64: Int64,
    _ weight: UnsafeRawPointer?, _ bias: UnsafeRawPointer?, _ configPointer: UnsafePointer<loldu_config>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let dtype = try Check.dtype(dtypeRaw)
        let m = try Check.size(m64, "m", minimum: 1)
        let n = try Check.size(n64, "n", minimum: 1)
        try Check.extent(m, n, dtype, "weight")
        let w = try Check.buffer(weight, "weight", dtype)
        let b = bias == nil ? nil : try Check.buffer(bias, "bias", dtype)
        let config = try configPointer.map { c throws(LoLDUError) in try Check.config(c) } ?? AdapterConfig()
        try config.validate(m: m, n: n)
        let adapter = try makeAdapter(dtype: dtype, m: m, n: n, weight: w, bias: b, config: config)
        out.pointee = adapters.insert(adapter)
    }
}

@_cdecl("loldu_adapter_clone")
public func lolduAdapterClone(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ source: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let adapter = try adapters.get(source, "src")
        out.pointee = adapters.insert(try adapter.cloneAdapter())
    }
}

@_cdecl("loldu_adapter_derive")
public func lolduAdapterDerive(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ base: OpaquePointer?, _ configPointer: UnsafePointer<loldu_config>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let adapter = try adapters.get(base, "base")
        let config = try Check.config(try Check.nonNull(configPointer, "config"))
        out.pointee = adapters.insert(try adapter.derive(config))
    }
}

@_cdecl("loldu_adapter_convert")
public func lolduAdapterConvert(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ source: OpaquePointer?, _ dtype: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let adapter = try adapters.get(source, "src")
        out.pointee = adapters.insert(try adapter.converted(to: try Check.dtype(dtype)))
    }
}

@_cdecl("loldu_adapter_free")
public func lolduAdapterFree(_ handle: OpaquePointer?) {
    adapters.remove(handle)
}

@_cdecl("loldu_adapter_get_info")
public func lolduAdapterGetInfo(_ handle: OpaquePointer?, _ info: UnsafeMutablePointer<loldu_adapter_info>?, _ size: Int) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let info = try Check.nonNull(info, "info")
        let expected = MemoryLayout<loldu_adapter_info>.size
        guard size == expected else {
            throw .invalid("info_size must be sizeof(loldu_adapter_info) = \(expected), got \(UInt(bitPattern: size))")
        }
        var i = loldu_adapter_info()
        i.dtype = a.dtype.rawValue
        i.param_dtype = a.dtype.parameterType.rawValue
        i.backend = Check.backendCode(a.backend)
        i.z_init = a.config.zInit.rawValue
        i.m = Int64(a.m)
        i.n = Int64(a.n)
        i.rank = Int64(a.rank)
        i.factor_rank = Int64(a.factorRank)
        i.num_trainable = Int64(a.trainableCount)
        i.degenerate_pivots = Int64(a.degeneratePivots)
        i.alpha = a.config.effectiveAlpha
        i.sigma = a.sigmaValue
        i.seed = a.config.seed
        i.residual = a.config.residual.rawValue
        i.path = a.path.rawValue
        i.has_bias = a.hasBias ? 1 : 0
        i.train_sigma = a.config.trainSigma ? 1 : 0
        i.borrow_weight = a.borrowsWeight ? 1 : 0
        i.enabled = a.enabled ? 1 : 0
        i.merged = a.merged ? 1 : 0
        let memory = a.memory
        i.bytes_weight = Int64(memory.weight)
        i.bytes_factors = Int64(memory.factors)
        i.bytes_state = Int64(memory.state)
        i.bytes_merged = Int64(memory.mergedCache)
        i.bytes_scratch = Int64(memory.scratch)
        i.init_change = try a.initialChange()
        info.pointee = i
    }
}

// MARK: Parameters and gradients

@_cdecl("loldu_get_z")
public func lolduGetZ(_ handle: OpaquePointer?, _ z: UnsafeMutableRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let out = try Check.mutableBuffer(z, "z", a.dtype.parameterType)
        out.copyMemory(from: a.paramsPointer, byteCount: a.rank * a.dtype.parameterType.byteSize)
    }
}

@_cdecl("loldu_get_coefficients")
public func lolduGetCoefficients(_ handle: OpaquePointer?, _ c: UnsafeMutableRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        a.writeCoefficients(try Check.mutableBuffer(c, "c", a.dtype.parameterType))
    }
}

@_cdecl("loldu_set_z")
public func lolduSetZ(_ handle: OpaquePointer?, _ z: UnsafeRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        try a.setZ(rawPointer: try Check.buffer(z, "z", a.dtype.parameterType))
    }
}

@_cdecl("loldu_get_sigma")
public func lolduGetSigma(_ handle: OpaquePointer?, _ sigma: UnsafeMutablePointer<Double>?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        try Check.nonNull(sigma, "sigma").pointee = a.sigmaValue
    }
}

@_cdecl("loldu_set_sigma")
public func lolduSetSigma(_ handle: OpaquePointer?, _ sigma: Double) -> Int32 {
    status { () throws(LoLDUError) in
        try adapters.get(handle, "adapter").setSigma(sigma)
    }
}

@_cdecl("loldu_params")
public func lolduParams(
    _ handle: OpaquePointer?, _ params: UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
    _ grads: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let g = try grads.map { _ throws(LoLDUError) in try a.gradsPointer() }
        params?.pointee = a.paramsPointer
        grads?.pointee = g
    }
}

@_cdecl("loldu_bias_grad")
public func lolduBiasGrad(_ handle: OpaquePointer?, _ db: UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let out = try Check.nonNull(db, "db")
        out.pointee = try a.biasGradPointer()
    }
}

@_cdecl("loldu_zero_grad")
public func lolduZeroGrad(_ handle: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in try adapters.get(handle, "adapter").zeroGrad() }
}

// MARK: Frozen factors

@_cdecl("loldu_get_factor")
public func lolduGetFactor(_ handle: OpaquePointer?, _ which: Int32, _ out: UnsafeMutableRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let factor: Factor?
        switch which {
        case 0: factor = .lower
        case 1: factor = .diagonal
        case 2: factor = .upper
        case 3: factor = .weight
        case 4: factor = .bias
        case 5: factor = nil
        default: throw .invalid("which must be a loldu_factor value in [0, 5], got \(which)")
        }
        let inElements = factor == .weight || factor == .bias
        let o = try Check.mutableBuffer(out, "out", inElements ? a.dtype : a.dtype.parameterType)
        if let factor {
            guard factor != .bias || a.hasBias else { throw .state("the adapter has no bias") }
            a.writeFactor(factor, o)
        } else {
            try a.writeResidual(o)
        }
    }
}

@_cdecl("loldu_get_pivots")
public func lolduGetPivots(_ handle: OpaquePointer?, _ ipiv: UnsafeMutablePointer<Int32>?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        a.writePivots(try Check.nonNull(ipiv, "ipiv"))
    }
}

// MARK: Forward and backward

/// Validates a batch size against the adapter's widest row.
private func batchSize(_ batch: Int64, _ a: any AnyAdapter) throws(LoLDUError) -> Int {
    let b = try Check.size(batch, "batch", minimum: 0)
    try Check.extent(b, max(a.m, a.n), a.dtype, "a batch")
    return b
}

@_cdecl("loldu_forward")
public func lolduForward(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?,
    _ h: UnsafeMutableRawPointer?
) -> Int32 {
    forward(handle, batch, x, nil, y, h)
}

@_cdecl("loldu_forward_bias")
public func lolduForwardBias(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ bias: UnsafeRawPointer?,
    _ y: UnsafeMutableRawPointer?, _ h: UnsafeMutableRawPointer?
) -> Int32 {
    forward(handle, batch, x, bias, y, h)
}

private func forward(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ bias: UnsafeRawPointer?,
    _ y: UnsafeMutableRawPointer?, _ h: UnsafeMutableRawPointer?
) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let b = try batchSize(batch, a)
        try a.checkCallBias(bias)
        guard b > 0 else { return }  // an empty batch does nothing, whatever the buffers
        let (dtype, p) = (a.dtype, a.dtype.parameterType)
        try Check.disjoint((UnsafeRawPointer(y), b * a.m, dtype, "y"), from: (x, b * a.n, dtype, "x"), (UnsafeRawPointer(h), b * a.rank, p, "h"), (bias, a.m, dtype, "bias"))
        try Check.disjoint((UnsafeRawPointer(h), b * a.rank, p, "h"), from: (x, b * a.n, dtype, "x"), (bias, a.m, dtype, "bias"))
        try a.forward(batch: b, x: try Check.buffer(x, "x", a.dtype), y: try Check.mutableBuffer(y, "y", a.dtype),
                      h: try Check.optionalBuffer(h, "h", a.dtype.parameterType),
                      bias: try Check.optionalBuffer(bias, "bias", a.dtype))
    }
}

@_cdecl("loldu_backward")
public func lolduBackward(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?,
    _ dx: UnsafeMutableRawPointer?, _ h: UnsafeRawPointer?
) -> Int32 {
    backward(handle, batch, x, dy, dx, h, grads: nil)
}

@_cdecl("loldu_backward_into")
public func lolduBackwardInto(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?,
    _ dx: UnsafeMutableRawPointer?, _ h: UnsafeRawPointer?, _ grads: UnsafeMutableRawPointer?
) -> Int32 {
    guard let grads else { return status { () throws(LoLDUError) in throw LoLDUError(.nullPointer, "grads is NULL") } }
    return backward(handle, batch, x, dy, dx, h, grads: grads)
}

private func backward(
    _ handle: OpaquePointer?, _ batch: Int64, _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?,
    _ dx: UnsafeMutableRawPointer?, _ h: UnsafeRawPointer?, grads: UnsafeMutableRawPointer?
) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let b = try batchSize(batch, a)
        let out = try Check.optionalBuffer(grads, "grads", a.dtype.parameterType)
        guard b > 0 else {
            out?.initializeMemory(as: UInt8.self, repeating: 0, count: (a.rank + 1) * a.dtype.parameterType.byteSize)
            return
        }
        let (dtype, p) = (a.dtype, a.dtype.parameterType)
        try Check.disjoint((UnsafeRawPointer(dx), b * a.n, dtype, "dx"), from: (x, b * a.n, dtype, "x"), (dy, b * a.m, dtype, "dy"), (UnsafeRawPointer(h), b * a.rank, p, "h"))
        try Check.disjoint((UnsafeRawPointer(grads), a.rank + 1, p, "grads"), from: (x, b * a.n, dtype, "x"), (dy, b * a.m, dtype, "dy"),
                           (UnsafeRawPointer(dx), b * a.n, dtype, "dx"), (UnsafeRawPointer(h), b * a.rank, p, "h"))
        try a.backward(batch: b, x: try Check.buffer(x, "x", a.dtype), dy: try Check.buffer(dy, "dy", a.dtype),
                       dx: try Check.optionalBuffer(dx, "dx", a.dtype),
                       h: try Check.optionalBuffer(h, "h", a.dtype.parameterType), grads: out)
    }
}

/// The adapters a grouped call's rows use (each once), their indices in the caller's list, and
/// the rows as indices into them; the base is `adapters[0]`. Only used entries of the caller's
/// list are looked up.
private func group(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?
) throws(LoLDUError) -> (base: any AnyAdapter, used: [any AnyAdapter], listIndex: [Int], rows: HeapBuffer<Int32>?, batch: Int) {
    guard count >= 1, count <= Int(Int32.max) else { throw .invalid("count must be in [1, \(Int32.max)], got \(UInt(bitPattern: count))") }
    let list = try Check.nonNull(list, "adapters")
    let base = try adapters.get(list[0], "adapters[0]")
    let b = try batchSize(batch, base)
    guard b > 0 else { return (base, [], [], nil, 0) }
    let rows = try Check.nonNull(rows, "rows")
    // Each used adapter's place in `used`: a table over `count` when that is small next to the
    // batch, else a dictionary (only the entries the rows use are read, so `count` may be large).
    // The tables sized by the caller's counts are heap buffers, and room for the collections
    // of up to `b` used adapters is checked first: no memory is an error, not a trap.
    try ensureRoom(b, bytesEach: 128)
    let slot = count <= 4 * b + 4096 ? try HeapBuffer<Int32>(repeating: -1, count: count) : nil
    var slots: [Int: Int32] = [:]
    var listIndex: [Int] = []
    let compact = try HeapBuffer<Int32>(count: b)
    for i in 0..<b {
        let a = Int(rows[i])
        guard a >= -1, a < count else { throw .invalid("rows[\(i)] = \(a) is not in [-1, \(count)) (count = \(count))") }
        guard a >= 0 else {
            compact.pointer[i] = -1
            continue
        }
        var s = slot?.pointer[a] ?? slots[a, default: -1]
        if s < 0 {
            s = Int32(listIndex.count)
            listIndex.append(a)
            if let slot { slot.pointer[a] = s } else { slots[a] = s }
        }
        compact.pointer[i] = s
    }
    let used = try adapters.get(list, listIndex) { "adapters[\($0)]" }
    return (base, used, listIndex, compact, b)
}

@_cdecl("loldu_grouped_forward")
public func lolduGroupedForward(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?
) -> Int32 {
    groupedForward(list, count, batch, rows, x, nil, y)
}

@_cdecl("loldu_grouped_forward_bias")
public func lolduGroupedForwardBias(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ bias: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?
) -> Int32 {
    groupedForward(list, count, batch, rows, x, bias, y)
}

private func groupedForward(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ bias: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?
) -> Int32 {
    status { () throws(LoLDUError) in
        let g = try group(list, count, batch, rows)
        try g.base.checkCallBias(bias)
        guard g.batch > 0 else { return }
        let x = try Check.buffer(x, "x", g.base.dtype), y = try Check.mutableBuffer(y, "y", g.base.dtype)
        let bias = try Check.optionalBuffer(bias, "bias", g.base.dtype)
        let (b, m, n, dtype) = (g.batch, g.base.m, g.base.n, g.base.dtype)
        try Check.disjoint((UnsafeRawPointer(y), b * m, dtype, "y"), from: (x, b * n, dtype, "x"), (bias, m, dtype, "bias"))
        guard let rows = g.rows?.pointer else { return }
        try g.base.groupedForward(g.used, listIndex: g.listIndex, rows: rows, batch: g.batch, x: x, y: y, bias: bias)
    }
}

@_cdecl("loldu_grouped_backward")
public func lolduGroupedBackward(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?, _ dx: UnsafeMutableRawPointer?
) -> Int32 {
    groupedBackward(list, count, batch, rows, x, dy, dx, grads: nil)
}

@_cdecl("loldu_grouped_backward_into")
public func lolduGroupedBackwardInto(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?, _ dx: UnsafeMutableRawPointer?,
    _ grads: UnsafePointer<UnsafeMutableRawPointer?>?
) -> Int32 {
    guard let grads else { return status { () throws(LoLDUError) in throw LoLDUError(.nullPointer, "grads is NULL") } }
    return groupedBackward(list, count, batch, rows, x, dy, dx, grads: grads)
}

private func groupedBackward(
    _ list: UnsafePointer<OpaquePointer?>?, _ count: Int, _ batch: Int64, _ rows: UnsafePointer<Int32>?,
    _ x: UnsafeRawPointer?, _ dy: UnsafeRawPointer?, _ dx: UnsafeMutableRawPointer?,
    grads: UnsafePointer<UnsafeMutableRawPointer?>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let g = try group(list, count, batch, rows)
        let dtype = g.base.dtype
        var outs: [UnsafeMutableRawPointer?]? = nil
        if let grads {
            outs = []
            for (j, i) in g.listIndex.enumerated() {
                outs!.append(try Check.optionalBuffer(grads[i], "grads[\(i)]", g.used[j].dtype.parameterType))
            }
        }
        guard g.batch > 0 else { return }
        let x = try Check.buffer(x, "x", dtype), dy = try Check.buffer(dy, "dy", dtype)
        let dx = try Check.optionalBuffer(dx, "dx", dtype)
        let (b, m, n) = (g.batch, g.base.m, g.base.n)
        try Check.disjoint((UnsafeRawPointer(dx), b * n, dtype, "dx"), from: (x, b * n, dtype, "x"), (dy, b * m, dtype, "dy"))
        if let outs {
            try Check.disjoint(grads: outs, count: { g.used[$0].rank + 1 }, dtype: { g.used[$0].dtype.parameterType },
                               name: { "grads[\(g.listIndex[$0])]" },
                               from: [(x, b * n, dtype, "x"), (dy, b * m, dtype, "dy"), (UnsafeRawPointer(dx), b * n, dtype, "dx")])
        }
        guard let rows = g.rows?.pointer else { return }
        try g.base.groupedBackward(g.used, listIndex: g.listIndex, rows: rows, batch: g.batch, x: x, dy: dy, dx: dx, grads: outs)
    }
}

@_cdecl("loldu_effective_weight")
public func lolduEffectiveWeight(_ handle: OpaquePointer?, _ w: UnsafeMutableRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        try a.writeEffectiveWeight(try Check.mutableBuffer(w, "w", a.dtype))
    }
}

@_cdecl("loldu_weight_backward")
public func lolduWeightBackward(_ handle: OpaquePointer?, _ dw: UnsafeRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        try a.weightBackward(rawPointer: try Check.buffer(dw, "dw", a.dtype), grads: nil)
    }
}

@_cdecl("loldu_weight_backward_into")
public func lolduWeightBackwardInto(_ handle: OpaquePointer?, _ dw: UnsafeRawPointer?, _ grads: UnsafeMutableRawPointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let out = try Check.mutableBuffer(grads, "grads", a.dtype.parameterType)
        try Check.disjoint((UnsafeRawPointer(out), a.rank + 1, a.dtype.parameterType, "grads"), from: (dw, a.m * a.n, a.dtype, "dw"))
        try a.weightBackward(rawPointer: try Check.buffer(dw, "dw", a.dtype), grads: out)
    }
}

// MARK: Merge, enable, path

@_cdecl("loldu_merge")
public func lolduMerge(_ handle: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in try adapters.get(handle, "adapter").merge() }
}

@_cdecl("loldu_unmerge")
public func lolduUnmerge(_ handle: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in try adapters.get(handle, "adapter").unmerge() }
}

@_cdecl("loldu_set_enabled")
public func lolduSetEnabled(_ handle: OpaquePointer?, _ enabled: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        a.setEnabled(try Check.flag(enabled, "enabled"))
    }
}

@_cdecl("loldu_set_path")
public func lolduSetPath(_ handle: OpaquePointer?, _ path: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        a.path = try Check.path(path)
    }
}

@_cdecl("loldu_plan")
public func lolduPlan(
    _ handle: OpaquePointer?, _ batch: Int64, _ keepsH: Int32, _ path: UnsafeMutablePointer<Int32>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let a = try adapters.get(handle, "adapter")
        let b = try Check.size(batch, "batch", minimum: 0)
        let keeps = try Check.flag(keepsH, "keeps_h")
        try Check.nonNull(path, "path").pointee = a.plan(batch: b, keepsH: keeps).rawValue
    }
}
