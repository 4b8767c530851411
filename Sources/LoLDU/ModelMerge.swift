import Glibc

extension Checkpoint {
    /// Layer `name`'s adapter on its base weight (and bias) in `model` (see ``ModelFiles`` for
    /// how names map to tensors), with the saved `z` and `σ`. The weight's fingerprint is checked
    /// before the factorisation. The adapter's element type is the tensor's when `fileType` (a
    /// bf16 file gives a bf16 adapter), else its parameter type (float32 for half types).
    public func adapter(_ name: String, in model: ModelFiles, fileType: Bool = true) throws(LoLDUError) -> any AnyAdapter {
        let (layer, weight) = try checkedWeight(name, in: model)
        let type = weight.dtype.parameterType
        let bias = try model.bias(layer: name, weight: weight)
        let adapter: any AnyAdapter
        do {
            adapter = try makeAdapter(dtype: type, m: weight.m, n: weight.n, weight: weight.values.pointer,
                                      bias: bias.map { UnsafeRawPointer($0.pointer) }, config: layer.config)
        } catch where error.code == .notFinite {  // a value of the model's tensors: say which file
            throw LoLDUError(.notFinite, "layer \"\(name)\" (tensor \"\(weight.key)\" and its bias in \(model.directory)): \(error.message)")
        }
        try apply(name, to: adapter)
        return fileType && weight.dtype != type ? try adapter.converted(to: weight.dtype) : adapter
    }

    /// Layer `name`'s base weight in `model` (see ``ModelFiles/weight(layer:)``), checked to be
    /// the one the checkpoint was saved on: its shape and its fingerprint.
    func checkedWeight(_ name: String, in model: ModelFiles) throws(LoLDUError) -> (Layer, ModelFiles.Weight) {
        let layer = try layer(name)
        let weight = try model.weight(layer: name)
        guard weight.m == layer.m, weight.n == layer.n else {
            throw LoLDUError(.mismatch, "layer \"\(name)\": saved on a \(layer.m) × \(layer.n) weight, but tensor \"\(weight.key)\" in \(model.directory) has shape \(weight.shape)")
        }
        let print = fingerprint(UnsafeRawBufferPointer(start: weight.values.pointer, count: weight.values.count))
        guard print == layer.weightFingerprint else {
            throw LoLDUError(.mismatch, "layer \"\(name)\": tensor \"\(weight.key)\" in \(model.directory) is not the weight the checkpoint was saved on (fingerprint \(print), saved \(layer.weightFingerprint)); \(Self.baseHint(saved: layer.dtype, base: weight.dtype))")
        }
        return (layer, weight)
    }
}

/// A checkpoint merged into a copy of its base model's files: the same layout (one file or
/// shards and their index), tensor names, order and metadata, each adapted weight replaced by
/// `W + A diag(c) U_r` computed in the parameter type (float32 for half types) and rounded
/// once to the file's type. Other files are copied, except hidden ones and weights in other
/// formats (`*.bin`, `*.pt`, `*.onnx`, …), which would still hold the unmerged weights.
///
/// Tensors are read from the files one at a time, so memory stays near the largest
/// adapted tensor and its factors, whatever the model's size. The output is an
/// ``AtomicDirectory``: a failed or killed merge leaves no output directory.
public enum ModelMerge {
    /// Bytes of tensors written so far, of all, and the tensor just written; returns false to
    /// stop the merge (`cancelled`).
    public typealias Progress = (_ done: Int, _ total: Int, _ tensor: String) -> Bool

    static let otherWeights = [".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".ot", ".safetensors"]

    /// `dtype`: every float32, bfloat16 and float16 tensor converted to it (and the config's
    /// `torch_dtype`), or nil to keep each tensor's type.
    public static func merge(_ checkpoint: Checkpoint, base: String, into output: String, dtype: DType?,
                             progress: Progress?) throws(LoLDUError) {
        try checkNewDirectoryName(output, what: "out_dir")
        if dtype == .float64 { throw .invalid("dtype must be float32, bfloat16 or float16 (0 keeps the file's types)") }
        var info = stat()
        if AtomicDirectory.exists(output, &info) {
            throw LoLDUError(.io, "\"\(output)\" already exists; a merge writes a new directory (or fills an empty one)")
        }
        let model = try ModelFiles(directory: base)
        let configPath = "\(base)/\(ModelFiles.configFile)"
        var config: [String: JSON]? = nil
        do throws(LoLDUError) {
            if let bytes = try AtomicFile.read(configPath, limit: 1 << 24, missingOK: true) {
                let json = try rethrowing { try bytes.withUnsafeBytes { raw in try JSON.parse(raw, what: configPath, nonFinite: true) } }
                guard let object = json.object else { throw LoLDUError(.format, "\(configPath): not a JSON object") }
                config = object
            }
        } catch where dtype == nil {
            // Copied as it is: a config this parser refuses but Python reads (duplicate keys, lone
            // surrogates) only goes without the check of tied embeddings.
        }
        var layerOf: [String: String] = [:]
        for layer in checkpoint.layers {  // every layer checked before anything is written
            let (_, weight) = try checkpoint.checkedWeight(layer.name, in: model)
            if let other = layerOf[weight.key] {
                throw LoLDUError(.mismatch, "layers \"\(other)\" and \"\(layer.name)\" both map to tensor \"\(weight.key)\"")
            }
            try checkUntied(weight, layer: layer.name, config: config, path: configPath)
            layerOf[weight.key] = layer.name
        }

        func target(_ tensor: SafeTensors.Tensor) -> DType? {
            guard let source = SafeTensors.dtype(named: tensor.dtype) else { return nil }
            guard let dtype, source != .float64 else { return source }
            return dtype
        }
        func outputBytes(_ tensor: SafeTensors.Tensor) -> Int {
            target(tensor).map { tensor.count * $0.byteSize } ?? tensor.range.count
        }
        let total = model.files.reduce(0) { sum, file in file.tensors.values.reduce(sum) { $0 + outputBytes($1) } }
        let written = Set(model.shards + [ModelFiles.indexFile] + (dtype == nil ? [] : [ModelFiles.configFile]))
        let others = try filesToCopy(from: base, "", skipping: written, depth: 0)  // (its refusals before any work)
        final class Counter { var done = 0 }
        let counter = Counter()

        let out = try AtomicDirectory(output, what: "out_dir")
        for (shard, file) in zip(model.shards, model.files) {
            var entries: [SafeTensors.Entry] = []
            for key in file.order {
                let tensor = file.tensors[key]!
                let type = target(tensor)
                let count = tensor.count
                func written() throws(LoLDUError) {
                    counter.done += outputBytes(tensor)
                    if let progress, !progress(counter.done, total, key) {
                        throw LoLDUError(.cancelled, "the merge was cancelled by its progress callback after \(key)")
                    }
                }
                let name = type.map(SafeTensors.name(of:)) ?? tensor.dtype
                guard let layer = layerOf[key] else {  // copied (and converted) piece by piece
                    entries.append(.init(name: key, dtype: name, shape: tensor.shape, body: .stream { writer throws(LoLDUError) in
                        try file.forEachPiece(of: tensor, as: type == nil ? nil : SafeTensors.dtype(named: tensor.dtype), to: type,
                                              what: "tensor \"\(key)\"") { piece throws(LoLDUError) in try writer.write(piece) }
                        try written()
                    }))
                    continue
                }
                entries.append(.init(name: key, dtype: name, shape: tensor.shape) { buffer throws(LoLDUError) in
                    let adapter = try checkpoint.adapter(layer, in: model, fileType: false)
                    guard adapter.m * adapter.n == count else {  // (one tensor per name: ModelFiles)
                        throw LoLDUError(.mismatch, "tensor \"\(key)\" has \(count) values, layer \"\(layer)\" \(adapter.m) × \(adapter.n)")
                    }
                    let merged = try HeapBuffer<UInt8>(count: count * adapter.dtype.byteSize)
                    try adapter.writeEffectiveWeight(merged.pointer)
                    try convertElementsInRange(merged.pointer, adapter.dtype, buffer.baseAddress!, type!, count: count,
                                               what: "tensor \"\(key)\" merged with layer \"\(layer)\"")
                    try written()
                })
            }
            try out.write(shard) { writer throws(LoLDUError) in try SafeTensors.write(entries, metadata: file.metadata, to: writer) }
        }
        if var index = model.index {
            if dtype != nil, var metadata = index["metadata"]?.object, metadata["total_size"] != nil {
                metadata["total_size"] = .number(total)
                index["metadata"] = .object(metadata)
            }
            try out.write(ModelFiles.indexFile) { writer throws(LoLDUError) in try writer.write(Array((JSON.object(index).pretty() + "\n").utf8)) }
        }
        if let dtype, var config {
            let keys = ["torch_dtype", "dtype"].filter { config[$0] != nil }
            for key in keys.isEmpty ? ["torch_dtype"] : keys { config[key] = .string(dtype.name) }
            try out.write(ModelFiles.configFile) { writer throws(LoLDUError) in try writer.write(Array((JSON.object(config).pretty() + "\n").utf8)) }
        }
        for path in others { try out.copy("\(base)/\(path)", as: path) }
        try out.commit(replace: false)
    }

    /// Architectures without an output embedding (a task head, or the bare encoder): a model whose
    /// architectures all end in one of these, or are the base model of its `model_type`
    /// (`BertModel` for "bert", `XLMRobertaModel` for "xlm-roberta"), ties nothing. Every other
    /// architecture (`BertForMaskedLM`, `GPT2LMHeadModel`, `MarianMTModel`, …) may have an
    /// `lm_head` that transformers ties to the input embedding.
    static let headless = ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                           "ForMultipleChoice", "ForNextSentencePrediction", "ForCTC", "EncoderModel"]

    /// Refuses (`invalid`) to merge into an embedding matrix (`vocab_size` rows, from the config
    /// or its `text_config`) of a model that may tie its input and output embeddings
    /// (`tie_word_embeddings` not false, transformers' default, and an architecture with a head
    /// that may be an output embedding, or none named): when loaded they are one tensor, so the
    /// merged file would change both where the adapter changed one.
    static func checkUntied(_ weight: ModelFiles.Weight, layer: String, config: [String: JSON]?, path: String) throws(LoLDUError) {
        guard let config else { return }
        let text = config["text_config"]?.object  // (multimodal models keep their language model's settings there)
        let tie = config["tie_word_embeddings"] ?? text?["tie_word_embeddings"]
        guard tie?.bool != false, [config["vocab_size"]?.int, text?["vocab_size"]?.int].contains(weight.m) else { return }
        let family = (config["model_type"]?.string ?? "").lowercased().filter { $0.isLetter || $0.isNumber }
        let architectures = config["architectures"]?.array?.compactMap(\.string) ?? []
        let untied = !architectures.isEmpty && architectures.allSatisfy { name in
            headless.contains { name.hasSuffix($0) } || name.lowercased() == family + "model"
        }
        guard !untied else { return }
        throw .invalid("layer \"\(layer)\": tensor \"\(weight.key)\" is a \(weight.m)-row embedding matrix (vocab_size) of a model that may tie its input and output embeddings (\(path): tie_word_embeddings \(tie == nil ? "unset, so true" : "true"), architectures \(architectures.isEmpty ? "unset" : architectures.joined(separator: ", "))); merged, it would change both, but the adapter changed one. Merge into a copy of the model saved untied (tie_word_embeddings false, the output embedding a tensor of its own), or adapt other layers")
    }

    /// The files under `base/relative` that a merge copies (paths relative to `base`), following
    /// links, without hidden entries, `skipping` (top level) and weights in other formats (but
    /// safetensors files in subdirectories, other modules' weights such as sentence-transformers'
    /// `2_Dense`).
    static func filesToCopy(from base: String, _ relative: String, skipping: Set<String>, depth: Int) throws(LoLDUError) -> [String] {
        var files: [String] = []
        let directory = relative.isEmpty ? base : "\(base)/\(relative)"
        guard depth < 16 else { throw LoLDUError(.io, "\"\(directory)\" is nested too deep (a link loop?)") }
        for name in try AtomicFile.allEntries(of: directory).sorted() where !name.hasPrefix(".") {
            let path = relative.isEmpty ? name : "\(relative)/\(name)"
            if depth == 0 && skipping.contains(name) { continue }
            var info = stat()
            guard stat("\(base)/\(path)", &info) == 0 else { throw AtomicFile.failure("cannot read", "\(base)/\(path)") }
            switch info.st_mode & S_IFMT {
            case S_IFDIR: files += try filesToCopy(from: base, path, skipping: skipping, depth: depth + 1)
            case S_IFREG where otherWeights.contains(where: { name.hasSuffix($0) }) && !(depth > 0 && name.hasSuffix(".safetensors")):
                continue
            case S_IFREG: files.append(path)
            default: throw LoLDUError(.io, "\"\(base)/\(path)\" is \(AtomicFile.kind(info.st_mode)); a model directory holds files and directories")
            }
        }
        return files
    }
}
