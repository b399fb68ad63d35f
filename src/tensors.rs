//! The loader a family builds its weights with: a [`TensorTable`] over a checkpoint's tensors
//! (a Hugging Face directory's `*.safetensors`, or a GGUF file), from which a family takes
//! each tensor or matrix by the checkpoint's own name with the shape it expects, and which
//! fails on any tensor left unused when the family is done (a silently ignored tensor is how
//! an unattached adapter or a misread architecture goes unnoticed).
//!
//! ```text
//! let mut t = ckpt.tensors(dtype, mode)?;            // models::Checkpoint
//! let embed = t.tensor("model.embed_tokens.weight", &[vocab, hidden])?;
//! let wq = t.matrix("model.layers.0.self_attn.q_proj.weight", &[heads * hd, hidden])?;
//! let stored = t.finish("myfamily", |name| name.ends_with("rotary_emb.inv_freq"))?;
//! ```
//!
//! Vectors and embeddings come dequantized to the compute dtype; matrices stay in their
//! stored block format in [`WeightsMode::Quantized`] (multiplied by the engine's block
//! kernels, [`crate::quant`]), dequantized in [`WeightsMode::Dequant`]. A NaN/Inf in any
//! tensor is a corrupted file and an error. Nothing here knows a family.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::quant::{Linear, WeightsMode};

/// A checkpoint opened for reading tensors by name: what a [`TensorTable`] reads from.
pub trait TensorSource {
    fn path(&self) -> &Path;
    fn names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn load(&mut self, name: &str, dtype: DType) -> Result<Tensor>;
    /// The stored type of a tensor: "F32", "F16", "BF16", "Q4_1", ...
    fn stored_type(&self, name: &str) -> String;
    /// A matrix kept in its stored (quantized) format; dense when the source has none.
    fn load_linear(&mut self, name: &str, dtype: DType, mode: WeightsMode) -> Result<Linear> {
        let _ = mode;
        Ok(Linear::Dense(self.load(name, dtype)?))
    }
    /// The `n` matrices of a merged `(n, out, in)` tensor, one per expert.
    fn load_experts(&mut self, name: &str, n: usize, dtype: DType, mode: WeightsMode) -> Result<Vec<Linear>> {
        let _ = mode;
        let t = self.load(name, dtype)?;
        (0..n).map(|e| Ok(Linear::Dense(t.get(e)?.contiguous()?))).collect()
    }
}

/// The tensors of a Hugging Face directory (the union of its `*.safetensors` files).
pub struct Safetensors {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// The file each tensor was read from.
    origin: HashMap<String, PathBuf>,
}

impl Safetensors {
    /// Reads every `*.safetensors` file of `dir` (a directory without one is an error).
    pub fn open(dir: &Path) -> Result<Self> {
        let files = safetensors_files(dir)?;
        if files.is_empty() {
            return Err(EngineError::io(dir, "no *.safetensors file in the model directory"));
        }
        let mut tensors = HashMap::new();
        let mut origin = HashMap::new();
        for f in &files {
            let part = candle_core::safetensors::load(f, &Device::Cpu)
                .map_err(|e| EngineError::io(f, format!("cannot read safetensors: {e}")))?;
            origin.extend(part.keys().map(|k| (k.clone(), f.clone())));
            tensors.extend(part);
        }
        Ok(Safetensors { dir: dir.to_path_buf(), tensors, origin })
    }

    /// Tensors already read (`dir` names them in messages).
    pub fn from_tensors(dir: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Safetensors { dir: dir.to_path_buf(), tensors, origin: HashMap::new() }
    }
}

impl TensorSource for Safetensors {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn stored_type(&self, name: &str) -> String {
        self.tensors.get(name).map(|t| format!("{:?}", t.dtype()).to_uppercase()).unwrap_or_default()
    }
    fn load(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| EngineError::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        // A NaN/Inf in a weight is a corrupted file, as in a GGUF (GgufFile::report_nonfinite).
        if let Some((i, v)) = crate::quant::first_nonfinite(t, 1)? {
            let file = self.origin.get(name).cloned().unwrap_or_else(|| self.dir.clone());
            return Err(EngineError::BadTensor {
                path: file,
                tensor: name.to_string(),
                message: format!(
                    "element {i} (of shape {:?}, {:?}) holds a non-finite value ({v}): the tensor data is corrupted \
                     (re-download or re-convert the model)",
                    t.dims(),
                    t.dtype()
                ),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }
}

impl<T: TensorSource + ?Sized> TensorSource for &mut T {
    fn path(&self) -> &Path {
        (**self).path()
    }
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        (**self).shape(name)
    }
    fn load(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        (**self).load(name, dtype)
    }
    fn stored_type(&self, name: &str) -> String {
        (**self).stored_type(name)
    }
    fn load_linear(&mut self, name: &str, dtype: DType, mode: WeightsMode) -> Result<Linear> {
        (**self).load_linear(name, dtype, mode)
    }
    fn load_experts(&mut self, name: &str, n: usize, dtype: DType, mode: WeightsMode) -> Result<Vec<Linear>> {
        (**self).load_experts(name, n, dtype, mode)
    }
}

/// A checkpoint's tensors as a family takes them: by name, with the shape it expects, each
/// recorded as used; [`TensorTable::finish`] refuses the tensors no one took.
pub struct TensorTable<'a> {
    src: Box<dyn TensorSource + 'a>,
    dtype: DType,
    mode: WeightsMode,
    used: BTreeSet<String>,
    /// How many matrices are stored in each type ("F32", "Q4_1", ...).
    stored_types: BTreeMap<String, usize>,
}

impl<'a> TensorTable<'a> {
    /// A table over `src`: tensors come in `dtype`, matrices in `mode`.
    pub fn new(src: impl TensorSource + 'a, dtype: DType, mode: WeightsMode) -> Self {
        TensorTable { src: Box::new(src), dtype, mode, used: BTreeSet::new(), stored_types: BTreeMap::new() }
    }

    /// The checkpoint (a directory or a file), for messages.
    pub fn path(&self) -> &Path {
        self.src.path()
    }

    /// The mode matrices are loaded in.
    pub fn mode(&self) -> WeightsMode {
        self.mode
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.src.shape(name).is_some()
    }

    /// The shape of `name` in the checkpoint, if it holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.src.shape(name)
    }

    /// Checks that `name` exists with `shape` and records it as used, without reading it (a
    /// tied head's copy, say).
    pub fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        match self.src.shape(name) {
            None => Err(EngineError::MissingTensor { path: self.path().into(), tensor: name.into() }),
            Some(got) if got != shape => Err(EngineError::ShapeMismatch {
                path: self.path().into(),
                tensor: name.into(),
                got,
                expected: shape.to_vec(),
            }),
            Some(_) => {
                self.used.insert(name.to_string());
                Ok(())
            }
        }
    }

    /// A tensor of `shape` (a norm's weight, a bias, the embedding), dequantized to the dtype.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check(name, shape)?;
        self.src.load(name, self.dtype)
    }

    /// [`TensorTable::tensor`] when the checkpoint holds `name`, `None` when it does not.
    pub fn optional_tensor(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.has(name) { self.tensor(name, shape).map(Some) } else { Ok(None) }
    }

    /// A matrix `[out, in]` of `shape`, in the table's mode; counted in [`TensorTable::finish`]'s
    /// stored types.
    pub fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<Linear> {
        self.check(name, shape)?;
        *self.stored_types.entry(self.src.stored_type(name)).or_insert(0) += 1;
        self.src.load_linear(name, self.dtype, self.mode)
    }

    /// The `n` matrices `[out, in]` of a merged `(n, out, in)` tensor (GGUF's experts), one per
    /// expert, in the table's mode; counted once.
    pub fn experts(&mut self, name: &str, n: usize, shape: &[usize]) -> Result<Vec<Linear>> {
        self.check(name, &[&[n][..], shape].concat())?;
        *self.stored_types.entry(self.src.stored_type(name)).or_insert(0) += 1;
        self.src.load_experts(name, n, self.dtype, self.mode)
    }

    /// The end of loading: an error naming the first tensor no one took (and how many there
    /// are) unless `ignorable` says it may be left, else how many matrices are stored in each
    /// type. `family` names the architecture in the message.
    pub fn finish(self, family: &str, ignorable: impl Fn(&str) -> bool) -> Result<BTreeMap<String, usize>> {
        let mut extra: Vec<String> = self.src.names().into_iter().filter(|x| !self.used.contains(x) && !ignorable(x)).collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(EngineError::UnexpectedTensor {
                path: self.path().into(),
                tensor: first.clone(),
                count: extra.len(),
                arch: family.into(),
            });
        }
        Ok(self.stored_types)
    }
}

/// The tensor shapes of a Hugging Face directory's `*.safetensors` files, read from their
/// headers alone (each header's length checked against its file before it is read).
pub fn safetensors_shapes(dir: &Path) -> Result<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut out = HashMap::new();
    for f in safetensors_files(dir)? {
        let bad = |m: String| EngineError::io(&f, format!("cannot read safetensors: {m}"));
        let mut file = File::open(&f).map_err(|e| EngineError::io(&f, e))?;
        let len = file.metadata().map_err(|e| EngineError::io(&f, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|e| bad(format!("no header ({e})")))?;
        let n = u64::from_le_bytes(n);
        if n > len - 8 {
            return Err(bad(format!("the header says it is {n} bytes long, the file has {len}")));
        }
        let mut h = vec![0u8; n as usize];
        file.read_exact(&mut h).map_err(|e| bad(e.to_string()))?;
        let j: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&h).map_err(|e| bad(format!("header: {e}")))?;
        for (name, v) in j {
            if name == "__metadata__" {
                continue;
            }
            let dims = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<usize>>>())
                .ok_or_else(|| bad(format!("header: tensor {name:?} has no valid shape")))?;
            out.insert(name, dims);
        }
    }
    Ok(out)
}

/// The `*.safetensors` files of `dir`, sorted.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The tensors of a safetensors file's bytes (`path` names it in messages): how the engine
/// reads every safetensors file (model weights, LoRA adapters).
pub fn safetensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| EngineError::io(path, format!("cannot read safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Safetensors {
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("a.weight".to_string(), t(&[4, 2])), ("b".to_string(), t(&[3])), ("c".to_string(), t(&[2]))]);
        Safetensors::from_tensors(Path::new("made-up"), tensors)
    }

    #[test]
    fn a_table_takes_by_name_and_shape_and_refuses_what_no_one_took() {
        let mut t = TensorTable::new(table(), DType::F32, WeightsMode::Dequant);
        assert!(matches!(t.matrix("a.weight", &[2, 4]), Err(EngineError::ShapeMismatch { .. })));
        assert!(matches!(t.tensor("nope", &[1]), Err(EngineError::MissingTensor { .. })));
        t.matrix("a.weight", &[4, 2]).unwrap();
        assert_eq!(t.optional_tensor("missing", &[1]).unwrap().map(|_| ()), None);
        t.tensor("b", &[3]).unwrap();
        match t.finish("made-up", |_| false) {
            Err(EngineError::UnexpectedTensor { tensor, count, arch, .. }) => {
                assert_eq!((tensor.as_str(), count, arch.as_str()), ("c", 1, "made-up"))
            }
            other => panic!("expected the unused tensor `c` to be refused, got {other:?}"),
        }
        let mut t = TensorTable::new(table(), DType::F32, WeightsMode::Dequant);
        t.matrix("a.weight", &[4, 2]).unwrap();
        t.check("b", &[3]).unwrap();
        let stored = t.finish("made-up", |n| n == "c").unwrap();
        assert_eq!(stored, BTreeMap::from([("F32".to_string(), 1)]));
    }
}
