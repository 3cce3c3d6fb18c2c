//! Fuzzed inputs at the protocol's edge: any `RenderSpec` a client can send (every field any
//! value, prompts with any characters, layouts and sampler names of any text) is checked into a
//! `SpecRequest` and resolved against any model description without a panic, and any bytes
//! decoded as one of the protocol's messages are an error or a message, never a panic.

use longtake_proto::spec::{Layout, ModelDescription, SpecRequest};
use longtake_proto::{
    Job, JobEvent, PromptCue, RenderSpec, SubmitRequest, TaskEvent, TaskRequest, Worker,
};
use proptest::prelude::*;
use prost::Message;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z=,0-9 ]{0,24}",
        Just("cfg=2,tp=2,ulysses=2,ring=2".to_string()),
        Just(String::new()),
    ]
}

fn number() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..200, any::<u32>(), Just(u32::MAX)]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        -10.0f64..50.0,
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY)
    ]
}

prop_compose! {
    fn spec()(
        prompt in text(), negative_prompt in text(), model in text(),
        frames in number(), width in number(), height in number(), steps in number(),
        guidance_scale in float(), shift in proptest::option::of(float()),
        scheduler in text(), seed in any::<u64>(), fps in number(), format in any::<i32>(),
        layout in text(), groups in number(), window in number(),
        overlap in proptest::option::of(number()), fusion in text(),
        cues in proptest::collection::vec((float(), text()), 0..4), noise in text(),
    ) -> RenderSpec {
        RenderSpec {
            input: None,
            prompt, negative_prompt, model, frames, width, height, steps, guidance_scale,
            shift, scheduler, seed, fps, format, layout, groups,
            window_latent_frames: window, overlap_latent_frames: overlap, fusion,
            prompt_timeline: cues
                .into_iter()
                .map(|(at_seconds, prompt)| PromptCue { at_seconds, prompt })
                .collect(),
            noise,
        }
    }
}

prop_compose! {
    fn model()(
        default_width in number(), default_height in number(), default_steps in number(),
        default_frames in number(), default_fps in number(),
        attention_heads in number(), ffn_dim in number(),
    ) -> ModelDescription {
        ModelDescription {
            takes_picture: None,
            name: "m".into(), default_width, default_height, default_steps, default_frames,
            default_fps, attention_heads, ffn_dim,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_spec_is_checked_and_resolved_without_a_panic(spec in spec(), model in model()) {
        if let Ok(request) = SpecRequest::try_from(&spec) {
            let _ = RenderSpec::from(&request);
            if let Ok(job) = request.resolve(&model) {
                let _ = RenderSpec::from(&job);
            }
        }
    }

    #[test]
    fn any_layout_text_parses_or_is_refused(text in ".{0,40}") {
        let _ = text.parse::<Layout>();
    }

    #[test]
    fn any_bytes_decode_to_a_message_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = RenderSpec::decode(bytes.as_slice());
        let _ = SubmitRequest::decode(bytes.as_slice());
        let _ = Job::decode(bytes.as_slice());
        let _ = JobEvent::decode(bytes.as_slice());
        let _ = TaskRequest::decode(bytes.as_slice());
        let _ = TaskEvent::decode(bytes.as_slice());
        let _ = Worker::decode(bytes.as_slice());
    }
}
