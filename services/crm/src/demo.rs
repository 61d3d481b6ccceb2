//! `crm demo seed`: realistic demo data for one tenant, sent through the
//! public gRPC API like any client would. Every command carries an
//! idempotency key derived from the seed's own numbering, so running it again
//! changes nothing and answers the same ids.
use std::net::SocketAddr;
use std::time::Duration;

use crm_proto::v1::accounts_client::AccountsClient;
use crm_proto::v1::contacts_client::ContactsClient;
use crm_proto::v1::leads_client::LeadsClient;
use crm_proto::v1::opportunities_client::OpportunitiesClient;
use crm_proto::v1::pipelines_client::PipelinesClient;
use crm_proto::v1::{
    AccountKind, CaptureLeadRequest, ChangeContactConsentRequest, ChangeLeadStatusRequest,
    ChangeOpportunityStageRequest, CommandOptions, ContactPreferences, ConvertLeadRequest,
    ConvertedOpportunity, CreateAccountRequest, CreateContactRequest, EmailAddress, LeadSource,
    LoseOpportunityRequest, Money, OpenOpportunityRequest, PersonName, PhoneNumber, PipelineStage,
    PublishPipelineRequest, Reason, StageKind, WinOpportunityRequest,
};
use tonic::Request;
use tonic::transport::Channel;

/// What the seed created (or found from an earlier run).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    pub accounts: usize,
    pub contacts: usize,
    pub consents: usize,
    pub leads: usize,
    pub conversions: usize,
    pub opportunities: usize,
    /// Commands answered from an earlier run's outcome.
    pub unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("{what} was refused: {status}")]
    Refused { what: String, status: tonic::Status },
}

const COMPANIES: &[(&str, &str, &str)] = &[
    ("Acme", "acme", "Manufacturing"),
    ("Globex", "globex", "Energy"),
    ("Initech", "initech", "Software"),
    ("Umbrella", "umbrella", "Pharmaceuticals"),
    ("Hooli", "hooli", "Internet"),
    ("Stark Industries", "stark", "Aerospace"),
    ("Wayne Enterprises", "wayne", "Conglomerate"),
    ("Tyrell", "tyrell", "Biotech"),
    ("Soylent", "soylent", "Food"),
    ("Cyberdyne", "cyberdyne", "Robotics"),
    ("Wonka", "wonka", "Confectionery"),
    ("Oscorp", "oscorp", "Chemicals"),
    ("Vandelay", "vandelay", "Import/Export"),
    ("Gringotts", "gringotts", "Banking"),
    ("Monarch", "monarch", "Research"),
];
const REGIONS: &[(&str, &str, &str, &str)] = &[
    ("Ltd", "en-GB", "Europe/London", "+44207183"),
    ("GmbH", "de-DE", "Europe/Berlin", "+49301234"),
    ("有限公司", "zh-Hans-CN", "Asia/Shanghai", "+86138001"),
];
const GIVEN: &[&str] = &[
    "Ada", "Grace", "Alan", "Barbara", "Edsger", "Frances", "Donald", "Margaret", "Ken", "Radia",
    "Wei", "Li", "Mei", "Jun", "Hannah", "Lukas", "Sofia", "Noah", "Olivia", "Mateo",
];
const FAMILY: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Liskov", "Dijkstra", "Allen", "Knuth", "Hamilton", "Thompson",
    "Perlman", "Zhang", "Wang", "Chen", "Liu", "Schmidt", "Müller", "Rossi", "García", "Smith",
];
const TITLES: &[&str] = &[
    "CEO",
    "CTO",
    "Head of Procurement",
    "Buyer",
    "Engineer",
    "Analyst",
    "Office Manager",
];

/// Leads to capture; every `CONVERT_EVERY`-th is qualified and converted.
pub const LEADS: usize = 60;
pub const CONVERT_EVERY: usize = 6;

/// Accounts to create; each gets `CONTACTS_PER_ACCOUNT` contacts.
pub const ACCOUNTS: usize = 30;
pub const CONTACTS_PER_ACCOUNT: usize = 10;

fn request<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(30));
    let metadata = request.metadata_mut();
    metadata.insert("x-tenant-id", tenant.parse().expect("tenant ids are ASCII"));
    metadata.insert("x-actor-id", "system:demo-seed".parse().expect("ASCII"));
    request
}

/// Business times count back from a fixed instant, so a second run sends
/// exactly the same requests (idempotency compares them).
const ANCHOR: &str = "2026-11-01T09:00:00Z";

fn options(key: String, days_ago: u64) -> Option<CommandOptions> {
    let anchor: jiff::Timestamp = ANCHOR.parse().expect("valid anchor");
    let at = anchor - jiff::SignedDuration::from_hours(24 * days_ago as i64);
    Some(CommandOptions {
        idempotency_key: key,
        expected_version: None,
        occurred_at: at.to_string(),
    })
}

/// Seeds `tenant` through the gRPC server at `address`.
pub async fn seed(address: SocketAddr, tenant: &str) -> Result<Seeded, SeedError> {
    let channel: Channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| SeedError::Connect { address, source })?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| SeedError::Connect { address, source })?;
    let mut accounts = AccountsClient::new(channel.clone());
    let mut contacts = ContactsClient::new(channel.clone());
    let mut leads = LeadsClient::new(channel.clone());
    let mut pipelines = PipelinesClient::new(channel.clone());
    let mut opportunities = OpportunitiesClient::new(channel);

    let mut account_ids = Vec::with_capacity(ACCOUNTS);
    let mut seeded = Seeded::default();
    let refused = |what: String| move |status| SeedError::Refused { what, status };
    let stage = |key: &str, kind: StageKind, probability_bp: u32, category: &str| PipelineStage {
        key: key.to_owned(),
        name: key.replace('_', " "),
        kind: kind.into(),
        probability_bp,
        category: category.to_owned(),
        max_days_in_stage: 14,
    };
    let pipeline = pipelines
        .publish_pipeline(request(
            tenant,
            PublishPipelineRequest {
                options: options("demo-seed:pipeline".to_owned(), 365),
                pipeline_id: String::new(),
                name: "New business".to_owned(),
                stages: vec![
                    stage("qualification", StageKind::Open, 1000, "pipeline"),
                    stage("discovery", StageKind::Open, 2500, "pipeline"),
                    stage("proposal", StageKind::Open, 5000, "best_case"),
                    stage("negotiation", StageKind::Open, 8000, "commit"),
                    stage("won", StageKind::Won, 10_000, "closed"),
                    stage("lost", StageKind::Lost, 0, "omitted"),
                ],
            },
        ))
        .await
        .map_err(refused("pipeline".to_owned()))?
        .into_inner();
    seeded.unchanged += usize::from(pipeline.unchanged);

    for a in 0..ACCOUNTS {
        let (company, slug, industry) = COMPANIES[a % COMPANIES.len()];
        let (suffix, language, zone, phone_prefix) = REGIONS[a % REGIONS.len()];
        let generation = a / COMPANIES.len();
        let domain = format!(
            "{slug}{}.example",
            if generation == 0 {
                String::new()
            } else {
                generation.to_string()
            }
        );
        // Spread over the last year of business time, oldest first.
        let days_ago = 365 - (a as u64 * 365 / ACCOUNTS as u64);
        let reply = accounts
            .create_account(request(
                tenant,
                CreateAccountRequest {
                    options: options(format!("demo-seed:account:{a}"), days_ago),
                    account_id: String::new(),
                    kind: AccountKind::Company.into(),
                    name: format!("{company} {suffix}"),
                    domains: vec![domain.clone()],
                    industry: industry.to_owned(),
                    tax_id: format!("DEMO{a:06}"),
                    parent_id: String::new(),
                    segment: ["enterprise", "mid_market", "smb"][a % 3].to_owned(),
                },
            ))
            .await
            .map_err(refused(format!("account {a}")))?
            .into_inner();
        seeded.accounts += 1;
        seeded.unchanged += usize::from(reply.unchanged);
        account_ids.push(reply.stream_id.clone());

        for c in 0..CONTACTS_PER_ACCOUNT {
            let n = a * CONTACTS_PER_ACCOUNT + c;
            let given = GIVEN[(n * 7) % GIVEN.len()];
            let family = FAMILY[(n * 11) % FAMILY.len()];
            let reply = contacts
                .create_contact(request(
                    tenant,
                    CreateContactRequest {
                        options: options(
                            format!("demo-seed:contact:{n}"),
                            days_ago.saturating_sub(c as u64),
                        ),
                        contact_id: String::new(),
                        name: Some(PersonName {
                            given: given.to_owned(),
                            family: family.to_owned(),
                        }),
                        emails: vec![EmailAddress {
                            address: format!("{}.{}{n}@{domain}", given.to_lowercase(), c),
                            primary: true,
                        }],
                        phones: vec![PhoneNumber {
                            number: format!("{phone_prefix}{n:05}"),
                            kind: "work".to_owned(),
                        }],
                        title: TITLES[n % TITLES.len()].to_owned(),
                        preferences: Some(ContactPreferences {
                            channel: ["email", "phone", "chat"][n % 3].to_owned(),
                            language: language.to_owned(),
                            time_zone: zone.to_owned(),
                            do_not_contact: n.is_multiple_of(17),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("contact {n}")))?
                .into_inner();
            seeded.contacts += 1;
            seeded.unchanged += usize::from(reply.unchanged);
            if n.is_multiple_of(3) {
                let reply = contacts
                    .change_contact_consent(request(
                        tenant,
                        ChangeContactConsentRequest {
                            options: options(
                                format!("demo-seed:consent:{n}"),
                                days_ago.saturating_sub(c as u64),
                            ),
                            contact_id: reply.stream_id,
                            purpose: "marketing_email".to_owned(),
                            granted: n.is_multiple_of(2),
                            source: "web_form".to_owned(),
                            basis: "consent".to_owned(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("consent {n}")))?
                    .into_inner();
                seeded.consents += 1;
                seeded.unchanged += usize::from(reply.unchanged);
            }
        }
        tracing::info!(account = a + 1, of = ACCOUNTS, "demo accounts seeded");
    }

    for l in 0..LEADS {
        let given = GIVEN[(l * 13) % GIVEN.len()];
        let family = FAMILY[(l * 5) % FAMILY.len()];
        let (company, slug, _) = COMPANIES[(l * 3) % COMPANIES.len()];
        let days_ago = 360 - (l as u64 * 360 / LEADS as u64);
        let reply = leads
            .capture_lead(request(
                tenant,
                CaptureLeadRequest {
                    options: options(format!("demo-seed:lead:{l}"), days_ago),
                    lead_id: String::new(),
                    name: Some(PersonName {
                        given: given.to_owned(),
                        family: family.to_owned(),
                    }),
                    company: format!("{company} Prospects {l}"),
                    emails: vec![EmailAddress {
                        address: format!("{}.{l}@lead.{slug}.example", given.to_lowercase()),
                        primary: true,
                    }],
                    phones: Vec::new(),
                    source: Some(LeadSource {
                        channel: ["web", "event", "referral", "import"][l % 4].to_owned(),
                        utm_source: ["newsletter", "linkedin", "", "search"][l % 4].to_owned(),
                        ..LeadSource::default()
                    }),
                },
            ))
            .await
            .map_err(refused(format!("lead {l}")))?
            .into_inner();
        seeded.leads += 1;
        seeded.unchanged += usize::from(reply.unchanged);
        let lead_id = reply.stream_id;
        // A path through the lifecycle, a few days apart.
        let path: &[&str] = match l % CONVERT_EVERY {
            0 => &["working", "qualified"],
            1 | 2 => &["working"],
            3 => &["working", "nurturing"],
            4 => &["disqualified"],
            _ => &[],
        };
        for (step, to) in path.iter().enumerate() {
            let reply = leads
                .change_lead_status(request(
                    tenant,
                    ChangeLeadStatusRequest {
                        options: options(
                            format!("demo-seed:lead:{l}:{to}"),
                            days_ago.saturating_sub(3 * (step as u64 + 1)),
                        ),
                        lead_id: lead_id.clone(),
                        status: (*to).to_owned(),
                        reason: (*to == "disqualified").then(|| Reason {
                            code: "no_budget".to_owned(),
                            text: String::new(),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("lead {l} to {to}")))?
                .into_inner();
            seeded.unchanged += usize::from(reply.unchanged);
        }
        if l % CONVERT_EVERY == 0 {
            let reply = leads
                .convert_lead(request(
                    tenant,
                    ConvertLeadRequest {
                        options: options(
                            format!("demo-seed:lead:{l}:convert"),
                            days_ago.saturating_sub(10),
                        ),
                        lead_id: lead_id.clone(),
                        account_id: String::new(),
                        // Every converted lead opens its first deal.
                        opportunity: Some(ConvertedOpportunity {
                            name: format!("Lead {l} first order"),
                            pipeline_id: pipeline.stream_id.clone(),
                            stage: "qualification".to_owned(),
                            amount: Some(Money {
                                amount_minor: 1_000_000 + (l as i64 * 250_000) % 4_000_000,
                                currency: "EUR".to_owned(),
                            }),
                            close_date: "2026-12-31".to_owned(),
                            owner: format!("user:rep{}", l % 5),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("conversion of lead {l}")))?
                .into_inner();
            seeded.conversions += 1;
            seeded.unchanged += usize::from(reply.unchanged);
        }
    }
    tracing::info!(leads = LEADS, "demo leads seeded");

    // Two deals per account, spread over the year and the stages: some won,
    // some lost, the rest open.
    for (a, account_id) in account_ids.iter().enumerate() {
        for d in 0..2 {
            let n = a * 2 + d;
            let days_ago = 330 - (n as u64 * 330 / (2 * ACCOUNTS) as u64);
            let reply = opportunities
                .open_opportunity(request(
                    tenant,
                    OpenOpportunityRequest {
                        options: options(format!("demo-seed:deal:{n}"), days_ago),
                        opportunity_id: String::new(),
                        name: format!("Deal {n}"),
                        account_id: account_id.clone(),
                        contact_id: String::new(),
                        pipeline_id: pipeline.stream_id.clone(),
                        stage: "qualification".to_owned(),
                        amount: Some(Money {
                            amount_minor: 500_000 + (n as i64 * 137_000) % 9_000_000,
                            currency: "EUR".to_owned(),
                        }),
                        close_date: (jiff::civil::date(2026, 12, 31)
                            - jiff::Span::new().days((n * 5) as i64))
                        .to_string(),
                        owner: format!("user:rep{}", n % 5),
                    },
                ))
                .await
                .map_err(refused(format!("deal {n}")))?
                .into_inner();
            seeded.opportunities += 1;
            seeded.unchanged += usize::from(reply.unchanged);
            let deal_id = reply.stream_id;
            let stages: &[&str] = match n % 5 {
                0 => &["discovery", "proposal", "negotiation"],
                1 => &["discovery"],
                2 => &["discovery", "proposal"],
                3 => &["proposal"],
                _ => &[],
            };
            for (step, to) in stages.iter().enumerate() {
                let reply = opportunities
                    .change_opportunity_stage(request(
                        tenant,
                        ChangeOpportunityStageRequest {
                            options: options(
                                format!("demo-seed:deal:{n}:{to}"),
                                days_ago.saturating_sub(7 * (step as u64 + 1)),
                            ),
                            opportunity_id: deal_id.clone(),
                            stage: (*to).to_owned(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} to {to}")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            }
            let closed_at = days_ago.saturating_sub(30);
            if n % 5 == 0 {
                let reply = opportunities
                    .win_opportunity(request(
                        tenant,
                        WinOpportunityRequest {
                            options: options(format!("demo-seed:deal:{n}:won"), closed_at),
                            opportunity_id: deal_id.clone(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} won")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            } else if n % 5 == 4 {
                let reply = opportunities
                    .lose_opportunity(request(
                        tenant,
                        LoseOpportunityRequest {
                            options: options(format!("demo-seed:deal:{n}:lost"), closed_at),
                            opportunity_id: deal_id.clone(),
                            reason: Some(Reason {
                                code: ["price", "timing", "competitor"][n % 3].to_owned(),
                                text: String::new(),
                            }),
                            competitor: if n % 3 == 2 {
                                "Initech".to_owned()
                            } else {
                                String::new()
                            },
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} lost")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            }
        }
    }
    Ok(seeded)
}
