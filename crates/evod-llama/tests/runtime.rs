//! The llama.cpp runtime against a numpy reference: a tiny llama GGUF that
//! gguf-py writes (`tests/py/tiny_llama.py write`), scored by `BaseModel::nll`
//! and by the script's float64 forward pass, with and without a control
//! vector; control-vector swaps, refusals, and files llama.cpp cannot load.
//!
//! The Python is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (`cargo xtask venv`; the script is run by `tests/common/tiny_llama.rs`,
//! which `tests/llm.rs` shares). Without the `llm` feature only
//! `not_built` runs.

#[cfg(not(feature = "llm"))]
#[test]
fn not_built() {
    let err = evod_llama::BaseModel::load(
        std::path::Path::new("any.gguf"),
        &evod_llama::LlamaOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, evod_llama::LlamaError::NotBuilt), "{err}");
    assert_eq!(
        err.to_string(),
        "this evod was built without the `llm` feature; rebuild with `--features llm`"
    );
}

#[cfg(feature = "llm")]
#[path = "../../../tests/common/tiny_llama.rs"]
mod tiny_llama;

#[cfg(feature = "llm")]
mod llm {
    use super::tiny_llama;
    use std::io::Write;
    use std::path::Path;
    use std::sync::{Arc, Mutex, OnceLock};

    use evod_llama::{BaseModel, LlamaError, LlamaOptions, Nll};

    const TEXT: &str = "the theater at the inn, a thin hen ran in the rain. \
        The 3 Cats sat at the gate; then the hen ate an egg. \
        a tether at the three trees, the heather in the north. ";

    /// `tiny_llama.py ARGS...`; its stdout.
    fn py(args: &[&str]) -> String {
        tiny_llama::run_script(args)
    }

    /// The tiny F32 model, written once per test binary.
    fn tiny() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            py(&["write", path.to_str().unwrap()]);
            dir
        });
        // Leaked with the OnceLock: lives for the test binary.
        Box::leak(dir.path().join("tiny.gguf").into_boxed_path())
    }

    fn exact() -> LlamaOptions {
        LlamaOptions {
            kv_f32: true,
            n_ctx: 256,
            n_batch: 32,
            ..LlamaOptions::default()
        }
    }

    /// numpy's NLL of `tokens` (window `window`, optional control vector).
    fn reference(
        model: &Path,
        tokens: &[i32],
        window: usize,
        cvec: Option<&[f32]>,
        kv_f16: bool,
    ) -> Nll {
        let dir = tempfile::tempdir().unwrap();
        let toks = dir.path().join("tokens.json");
        let list: Vec<String> = tokens.iter().map(i32::to_string).collect();
        std::fs::write(&toks, format!("[{}]", list.join(","))).unwrap();
        let mut args = vec![
            "nll".to_owned(),
            model.to_str().unwrap().to_owned(),
            window.to_string(),
            toks.to_str().unwrap().to_owned(),
        ];
        if let Some(v) = cvec {
            let path = dir.path().join("cvec.f32");
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&path, bytes).unwrap();
            args.push(path.to_str().unwrap().to_owned());
        }
        if kv_f16 {
            args.push("--kv-f16".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let json: serde_json::Value = serde_json::from_str(&py(&args)).unwrap();
        Nll {
            sum: json["sum"].as_f64().unwrap(),
            count: json["count"].as_u64().unwrap(),
        }
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    /// A deterministic pseudo-random vector (xorshift), values in [-scale, scale).
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn no_beat() -> impl FnMut() {
        || {}
    }

    #[test]
    fn shape_and_tokenizer() {
        let m = BaseModel::load(tiny(), &exact()).unwrap();
        assert_eq!(m.architecture(), "llama");
        assert_eq!((m.n_embd(), m.n_layer()), (32, 3));
        assert_eq!(m.cvec_len(), 32 * 2);
        let toks = m.tokenize(TEXT).unwrap();
        assert!(
            toks.len() > 60 && toks.len() < TEXT.len(),
            "{} tokens",
            toks.len()
        );
        assert!(toks.iter().all(|&t| t >= 0 && (t as usize) < m.n_vocab()));
        // "▁the" is one piece of the vocabulary; digits and capitals fall
        // back to byte tokens <0x33> (id 3 + 0x33).
        assert!(toks.contains(&(3 + 0x33)), "{toks:?}");
        assert!(matches!(m.tokenize(""), Err(LlamaError::EmptyText)));
    }

    #[test]
    fn perplexity_matches_numpy_with_and_without_a_control_vector() {
        let mut m = BaseModel::load(tiny(), &exact()).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let window = 64;
        let mut beats = 0;
        let base = m.nll(&toks, window, &mut || beats += 1).unwrap();
        let windows = toks.len().div_ceil(window);
        assert_eq!(base.count as usize, toks.len() - windows);
        assert!(
            beats >= windows * 2,
            "{beats} beats for {windows} windows of 2 batches"
        );
        let want = reference(tiny(), &toks, window, None, false);
        assert_eq!(base.count, want.count);
        let r = rel(base.perplexity(), want.perplexity());
        eprintln!(
            "ppl llama.cpp {} numpy {} rel {r:e}",
            base.perplexity(),
            want.perplexity()
        );
        // The brief's bound is 1e-3; F32 throughout agrees to ~1e-10.
        assert!(r < 1e-6, "llama.cpp {base:?} numpy {want:?}");

        let cvec = noise(m.cvec_len(), 42, 1.5);
        m.set_control_vector(Some(&cvec)).unwrap();
        let steered = m.nll(&toks, window, &mut no_beat()).unwrap();
        let want_steered = reference(tiny(), &toks, window, Some(&cvec), false);
        let r = rel(steered.perplexity(), want_steered.perplexity());
        eprintln!(
            "steered ppl llama.cpp {} numpy {} rel {r:e}",
            steered.perplexity(),
            want_steered.perplexity()
        );
        assert!(r < 1e-6, "llama.cpp {steered:?} numpy {want_steered:?}");
        // The vector matters far more than the tolerance.
        assert!(rel(want_steered.perplexity(), want.perplexity()) > 0.01);
    }

    #[test]
    fn beats_from_inside_a_decode_and_a_panicking_beat_unwinds_after_it() {
        // One window, one decode (n_batch = n_ctx): every beat but the last
        // comes from llama.cpp's abort callback, between graph nodes.
        let opts = LlamaOptions {
            n_ctx: 128,
            n_batch: 128,
            ..LlamaOptions::default()
        };
        let mut m = BaseModel::load(tiny(), &opts).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let toks = &toks[..toks.len().min(128)];
        let mut beats = 0;
        let base = m.nll(toks, 128, &mut || beats += 1).unwrap();
        assert!(
            beats > 3 * 3,
            "{beats} beats for one decode of a 3-layer model: the decode did not beat"
        );
        // A beat that panics inside the decode: the panic reaches the
        // caller after llama_decode has returned (not through its C
        // frames), and the callback is unregistered.
        let mut calls = 0;
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.nll(toks, 128, &mut || {
                calls += 1;
                if calls == 2 {
                    panic!("beat failed");
                }
            })
        }));
        let payload = caught.expect_err("the beat's panic was swallowed");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"beat failed"));
        assert_eq!(calls, 2, "the beat ran again after it panicked");
        let mut again = 0;
        let after = m.nll(toks, 128, &mut || again += 1).unwrap();
        assert_eq!(after, base);
        assert_eq!(again, beats);
    }

    #[test]
    fn default_f16_cache_matches_numpy_rounding_like_it() {
        let opts = LlamaOptions {
            n_ctx: 256,
            ..LlamaOptions::default()
        };
        let mut m = BaseModel::load(tiny(), &opts).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let got = m.nll(&toks, 100, &mut no_beat()).unwrap();
        let want = reference(tiny(), &toks, 100, None, true);
        let r = rel(got.perplexity(), want.perplexity());
        eprintln!(
            "f16 kv: ppl llama.cpp {} numpy {} rel {r:e}",
            got.perplexity(),
            want.perplexity()
        );
        // ~5e-6 seen: numpy rounds q, k, v and the attention weights to f16
        // like llama.cpp, but not every f16 product in the same order.
        assert!(r < 1e-4, "llama.cpp {got:?} numpy {want:?}");
    }

    #[test]
    fn zero_vector_is_no_vector_and_swaps_need_no_reload() {
        let mut m = BaseModel::load(tiny(), &exact()).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let base = m.nll(&toks, 50, &mut no_beat()).unwrap();
        m.set_control_vector(Some(&vec![0.0; m.cvec_len()]))
            .unwrap();
        let zero = m.nll(&toks, 50, &mut no_beat()).unwrap();
        assert_eq!(zero.sum.to_bits(), base.sum.to_bits());
        let v = noise(m.cvec_len(), 7, 1.0);
        m.set_control_vector(Some(&v)).unwrap();
        let a = m.nll(&toks, 50, &mut no_beat()).unwrap();
        assert_ne!(a.sum.to_bits(), base.sum.to_bits());
        m.set_control_vector(None).unwrap();
        let cleared = m.nll(&toks, 50, &mut no_beat()).unwrap();
        assert_eq!(cleared.sum.to_bits(), base.sum.to_bits());
        m.set_control_vector(Some(&v)).unwrap();
        let again = m.nll(&toks, 50, &mut no_beat()).unwrap();
        assert_eq!(again.sum.to_bits(), a.sum.to_bits());
    }

    #[test]
    fn bad_vectors_and_inputs_are_refused_and_the_model_keeps_working() {
        let mut m = BaseModel::load(tiny(), &exact()).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let base = m.nll(&toks, 64, &mut no_beat()).unwrap();
        let n = m.cvec_len();
        match m.set_control_vector(Some(&vec![0.5; n + 32])) {
            Err(LlamaError::CvecWidth { expected, got }) => {
                assert_eq!((expected, got), (n, n + 32))
            }
            other => panic!("{other:?}"),
        }
        let mut nan = vec![0.0; n];
        nan[5] = f32::NAN;
        assert!(matches!(
            m.set_control_vector(Some(&nan)),
            Err(LlamaError::CvecNotFinite { index: 5, .. })
        ));
        let mut inf = vec![0.0; n];
        inf[n - 1] = f32::INFINITY;
        assert!(matches!(
            m.set_control_vector(Some(&inf)),
            Err(LlamaError::CvecNotFinite { .. })
        ));
        assert!(matches!(
            m.nll(&toks[..1], 64, &mut no_beat()),
            Err(LlamaError::TooFewTokens { count: 1 })
        ));
        assert!(matches!(
            m.nll(&toks, 1, &mut no_beat()),
            Err(LlamaError::Window { window: 1, .. })
        ));
        assert!(matches!(
            m.nll(&toks, 257, &mut no_beat()),
            Err(LlamaError::Window {
                window: 257,
                n_ctx: 256
            })
        ));
        let mut bad = toks.clone();
        bad[3] = m.n_vocab() as i32;
        assert!(matches!(
            m.nll(&bad, 64, &mut no_beat()),
            Err(LlamaError::Token { index: 3, .. })
        ));
        // Nothing of that changed the model.
        let after = m.nll(&toks, 64, &mut no_beat()).unwrap();
        assert_eq!(after.sum.to_bits(), base.sum.to_bits());
    }

    #[test]
    fn huge_vector_gives_a_typed_error_not_a_crash_and_is_forgotten() {
        let mut m = BaseModel::load(tiny(), &exact()).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let base = m.nll(&toks, 64, &mut no_beat()).unwrap();
        m.set_control_vector(Some(&vec![3.0e38; m.cvec_len()]))
            .unwrap();
        match m.nll(&toks, 64, &mut no_beat()) {
            Err(LlamaError::NonFiniteLogits { .. }) => {}
            other => panic!("{other:?}"),
        }
        m.set_control_vector(None).unwrap();
        let after = m.nll(&toks, 64, &mut no_beat()).unwrap();
        assert_eq!(after.sum.to_bits(), base.sum.to_bits());
    }

    /// A `tracing` subscriber writing into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn unloadable_files_are_load_errors_with_llama_cpp_s_reason_in_the_log() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        evod_llama::route_logs_to_tracing();

        let dir = tempfile::tempdir().unwrap();
        let whole = std::fs::read(tiny()).unwrap();
        let truncated = dir.path().join("truncated.gguf");
        std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
        let random = dir.path().join("random.gguf");
        std::fs::write(
            &random,
            noise(4096, 3, 1.0)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let missing = dir.path().join("missing.gguf");
        for path in [&truncated, &random] {
            match BaseModel::load(path, &exact()) {
                Err(LlamaError::Load { path: p, reason }) => {
                    assert_eq!(&p, path);
                    assert!(!reason.contains("logged no warning"), "{reason}");
                    let msg = LlamaError::Load {
                        path: p,
                        reason: reason.clone(),
                    }
                    .to_string();
                    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
                    eprintln!("{msg}");
                    // The reason llama.cpp gave is in our log too.
                    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
                    let first = reason.split("; ").next().unwrap();
                    assert!(log.contains(first), "{first:?} not in the log:\n{log}");
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        match BaseModel::load(&missing, &exact()) {
            Err(LlamaError::Load { reason, .. }) => {
                assert!(reason.contains("No such file"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match BaseModel::load(dir.path(), &exact()) {
            Err(LlamaError::Load { reason, .. }) => {
                assert!(reason.contains("not a regular file"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_vector_files_round_trip_into_the_model() {
        let mut m = BaseModel::load(tiny(), &exact()).unwrap();
        let toks = m.tokenize(TEXT).unwrap();
        let v = noise(m.cvec_len(), 99, 0.8);
        m.set_control_vector(Some(&v)).unwrap();
        let direct = m.nll(&toks, 64, &mut no_beat()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cv.gguf");
        let extra = [(
            "evod.note".to_owned(),
            evod_gguf::Value::String("test".into()),
        )];
        evod_llama::write_control_vector(&path, m.architecture(), m.n_embd(), &v, &extra).unwrap();
        let cv = evod_llama::read_control_vector(&path).unwrap();
        assert_eq!(cv.model_hint.as_deref(), Some("llama"));
        assert_eq!(cv.layer_count, Some(2));
        let loaded = cv.for_model(&path, m.n_embd(), m.n_layer()).unwrap();
        assert_eq!(loaded, v);
        m.set_control_vector(None).unwrap();
        m.set_control_vector(Some(&loaded)).unwrap();
        let from_file = m.nll(&toks, 64, &mut no_beat()).unwrap();
        assert_eq!(from_file.sum.to_bits(), direct.sum.to_bits());

        // Wrong width for this model: refused by name.
        let narrow = dir.path().join("narrow.gguf");
        evod_llama::write_control_vector(&narrow, "llama", 16, &v, &[]).unwrap();
        let err = evod_llama::read_control_vector(&narrow)
            .unwrap()
            .for_model(&narrow, m.n_embd(), m.n_layer())
            .unwrap_err();
        assert!(
            err.to_string().contains("narrow.gguf") && err.to_string().contains("n_embd is 32"),
            "{err}"
        );
    }
}
