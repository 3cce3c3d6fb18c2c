//! Fuzzed inputs at the coordinator's edges: any bytes under a job key in etcd (random, or a
//! valid record with bytes changed, or any JSON) load as a job, a job with a problem or an
//! error naming the key, never a panic; any tokens file is parsed or refused by line; any
//! authorization header names a caller or is refused; any spec submitted to the job table is
//! queued or refused.

use longtake_coordinator::access::{Access, Tokens};
use longtake_coordinator::jobs::JobTable;
use longtake_coordinator::record::JobRecord;
use longtake_coordinator::store::format;
use longtake_proto::spec::{Limits, SpecRequest};
use longtake_proto::RenderSpec;
use proptest::prelude::*;

const KEY: &str = "/longtake/jobs/j-fuzz";

fn valid_record() -> Vec<u8> {
    let request = SpecRequest::try_from(&RenderSpec {
        prompt: "a red circle bouncing on a blue background".into(),
        model: "toy".into(),
        layout: "cfg=2".into(),
        guidance_scale: 5.0,
        ..Default::default()
    })
    .unwrap();
    let record = JobRecord {
        owner: "studio-a".into(),
        request_id: "shot-7".into(),
        ..JobRecord::queued("j-fuzz".into(), request, 3, "shot 7".into(), 10)
    };
    format::encode(&record)
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("schema".to_string()),
                    Just("id".to_string()),
                    Just("phase".to_string()),
                    Just("spec".to_string()),
                    Just("plan".to_string()),
                    Just("owner".to_string()),
                    Just("checkpoint".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_under_a_job_key_load_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = format::decode(KEY, &bytes);
    }

    #[test]
    fn a_record_with_changed_bytes_loads_or_is_refused(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = valid_record();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = format::decode(KEY, &bytes);
        let _ = format::decode(KEY, &bytes[..cut.index(bytes.len())]);
    }

    #[test]
    fn any_json_under_a_job_key_loads_or_is_refused(value in json(), schema in 0u32..4) {
        let _ = format::decode(KEY, value.to_string().as_bytes());
        let mut with_schema = value;
        if let Some(object) = with_schema.as_object_mut() {
            object.insert("schema".into(), schema.into());
            object.insert("id".into(), "j-fuzz".into());
        }
        let _ = format::decode(KEY, with_schema.to_string().as_bytes());
    }

    #[test]
    fn any_tokens_file_and_header_are_read_or_refused(file in ".{0,200}", header in proptest::option::of(".{0,60}")) {
        if let Ok(tokens) = Tokens::parse(&file) {
            let _ = Access::Tokens(tokens).caller(header.as_deref());
        }
        let _ = Access::Open.caller(header.as_deref());
    }

    #[test]
    fn any_submission_is_queued_or_refused(
        prompt in ".{0,40}", name in ".{0,40}", request_id in ".{0,20}", owner in ".{0,12}",
        frames in any::<u32>(), width in any::<u32>(), steps in any::<u32>(),
        layout in "[a-z=,0-9]{0,16}", groups in any::<u32>(),
    ) {
        let mut table = JobTable::new(Limits::default(), 3);
        let spec = RenderSpec {
            prompt, model: "toy".into(), frames, width, height: width, steps, layout, groups,
            ..Default::default()
        };
        let _ = table.submit(&spec, 0, &name, &request_id, &owner, 1);
        let _ = table.submit(&spec, 0, &name, &request_id, &owner, 2);
    }
}
