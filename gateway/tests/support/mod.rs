//! The harness the socket tests share: a standalone gateway on a free port, tokens, uploads.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};

pub struct Gateway {
    pub running: Running,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub async fn gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("tiers.yaml"),
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 'memory://'}}\n",
    )
    .unwrap();
    let options = standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        config_dir: config,
        database_url: None,
        auth: AuthSettings { secret: Some(b"test-secret".to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec![],
        nats_url: None,
        link_key: None,
    };
    Gateway { running: standalone::start(options).await.unwrap(), client: reqwest::Client::new(), _dir: dir }
}

impl Gateway {
    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        self.running.state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
    }

    pub async fn upload(&self, user: &str, filename: &str) -> Value {
        let form = Form::new().part("file", Part::bytes(filename.as_bytes().to_vec()).file_name(filename.to_owned()));
        let response = self
            .client
            .post(format!("{}/api/v1/documents", self.running.url))
            .bearer_auth(self.token(user, &["user"]))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }
}
